//! Runs the application's Python hooks for the core, off the threads that move frames.
//!
//! Each call goes to tokio's blocking pool and attaches to the interpreter there, so a slow hook delays only the
//! handshake or subscription waiting for it. The callables are fastws's own adapters (`fastws/_hooks.py`), which
//! build `Request`/`User` objects, run sync or `async def` hooks, log tracebacks, and return plain values:
//! authenticate → None or (user id, info as JSON text); authorize → False, True, or member info as JSON text.

use std::sync::Arc;

use pyo3::prelude::*;
use serde_json::{Map, Value};

use crate::auth::{Authorization, HookFuture, HookResult, Hooks, User};
use crate::handshake::ConnectRequest;

pub struct PyHooks {
    pub authenticate: Option<Arc<Py<PyAny>>>,
    pub authorize: Option<Arc<Py<PyAny>>>,
    /// `(socket_id, user_id | None, user_info_json | None, path, query, headers, remote_addr)`.
    pub on_connect: Option<Arc<Py<PyAny>>>,
    /// `(socket_id, close_code)`.
    pub on_disconnect: Option<Arc<Py<PyAny>>>,
}

/// Run `call` on a blocking-pool thread attached to the interpreter; a Python exception becomes its message.
fn run_blocking<T, F>(call: F) -> HookFuture<T>
where
    T: Send + 'static,
    F: for<'py> FnOnce(Python<'py>) -> PyResult<HookResult<T>> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(move || Python::attach(|py| call(py).unwrap_or_else(|e| Err(e.to_string()))))
            .await
            .unwrap_or_else(|e| Err(format!("hook thread failed: {e}")))
    })
}

fn parse_info(json: &str) -> HookResult<Map<String, Value>> {
    match serde_json::from_str(json) {
        Ok(Value::Object(info)) => Ok(info),
        _ => Err("the hook's info is not a JSON object".into()),
    }
}

impl Hooks for PyHooks {
    fn has_authenticate(&self) -> bool {
        self.authenticate.is_some()
    }

    fn has_authorize(&self) -> bool {
        self.authorize.is_some()
    }

    fn has_lifecycle(&self) -> bool {
        self.on_connect.is_some() || self.on_disconnect.is_some()
    }

    fn connected(&self, socket_id: &str, user: Option<&Arc<User>>, request: &ConnectRequest) -> HookFuture<()> {
        let Some(func) = self.on_connect.clone() else { return Box::pin(async { Ok(()) }) };
        let args = (
            socket_id.to_owned(),
            user.map(|user| user.id.to_string()),
            user.map(|user| Value::Object(user.info.clone()).to_string()),
            request.path.clone(),
            request.query.clone(),
            request.headers.clone(),
            request.remote_addr.to_string(),
        );
        run_blocking(move |py| func.bind(py).call1(args).map(|_| Ok(())))
    }

    fn disconnected(&self, socket_id: &str, code: u16) -> HookFuture<()> {
        let Some(func) = self.on_disconnect.clone() else { return Box::pin(async { Ok(()) }) };
        let args = (socket_id.to_owned(), code);
        run_blocking(move |py| func.bind(py).call1(args).map(|_| Ok(())))
    }

    fn authenticate(&self, request: &ConnectRequest) -> HookFuture<Option<User>> {
        let Some(func) = self.authenticate.clone() else { return Box::pin(async { Ok(None) }) };
        let args =
            (request.path.clone(), request.query.clone(), request.headers.clone(), request.remote_addr.to_string());
        run_blocking(move |py| {
            let result = func.bind(py).call1(args)?;
            if result.is_none() {
                return Ok(Ok(None));
            }
            let (id, info): (String, String) = result.extract()?;
            Ok(parse_info(&info).map(|info| Some(User { id: id.into(), info, from_jwt: false })))
        })
    }

    fn authorize(&self, user: &Arc<User>, channel: &str) -> HookFuture<Authorization> {
        let Some(func) = self.authorize.clone() else { return Box::pin(async { Ok(Authorization::Denied) }) };
        let info = Value::Object(user.info.clone()).to_string();
        let args = (user.id.to_string(), info, channel.to_owned());
        run_blocking(move |py| {
            let result = func.bind(py).call1(args)?;
            if let Ok(allowed) = result.extract::<bool>() {
                return Ok(Ok(if allowed { Authorization::Allowed } else { Authorization::Denied }));
            }
            let info: String = result.extract()?;
            Ok(parse_info(&info).map(Authorization::AllowedWithInfo))
        })
    }
}
