//! `fastws._fastws.NativeServer`: the running server as Python sees it (start, stop, push, stats).
//!
//! Python's `fastws.Server` (app.py) wraps this class; the stub in `_fastws.pyi` documents it. Each call that can
//! take time (stop joins the runtime thread; cluster reads wait for Redis; a push waiting for room in a full push
//! queue) releases the GIL first. Pushes are queued for the runtime (bridge/push_queue.rs), never fanned out on
//! the caller's thread.

use std::sync::{Arc, Mutex, PoisonError};

use pyo3::conversion::FromPyObjectOwned;
use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::auth::{Hooks, JwtSettings, JwtVerifier, OriginRule};
use crate::bridge::callbacks::PyHooks;
use crate::bridge::payload;
use crate::bridge::push_queue::{self, NotQueued, Push, PushQueue};
use crate::broker::redis::RedisSettings;
use crate::broker::BrokerError;
use crate::config::{seconds, ChannelPatterns, ServerConfig};
use crate::hub::{ChannelInfo, Hub};
use crate::protocol;
use crate::server::{RunningServer, StartError};

#[pyclass(name = "NativeServer", module = "fastws._fastws", frozen)]
pub struct PyServer {
    config: ServerConfig,
    running: Mutex<Option<Running>>,
}

struct Running {
    server: RunningServer,
    pushes: PushQueue,
}

fn not_running() -> PyErr {
    PyRuntimeError::new_err("the server is not running")
}

/// One resolved setting, or None when it is absent or None (the Rust default then applies).
fn setting<'py, T: FromPyObjectOwned<'py>>(settings: &Bound<'py, PyDict>, name: &str) -> PyResult<Option<T>> {
    match settings.get_item(name)? {
        Some(value) if !value.is_none() => value.extract::<T>().map(Some).map_err(|e| {
            let error: PyErr = e.into();
            PyValueError::new_err(format!("invalid setting {name}: {error}"))
        }),
        _ => Ok(None),
    }
}

impl PyServer {
    fn hub(&self) -> PyResult<Arc<Hub>> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.as_ref().map(|running| Arc::clone(running.server.hub())).ok_or_else(not_running)
    }

    /// Queue a push for the runtime's fan-out task; returns `audience` (computed with the registry as it is now).
    fn enqueue(&self, py: Python<'_>, push: Push, audience: impl FnOnce(&Hub) -> usize) -> PyResult<usize> {
        let (count, push, sender) = {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            let running = running.as_ref().ok_or_else(not_running)?;
            let hub = running.server.hub();
            let count = audience(hub);
            // Nobody on this node and no other node: there is nothing to deliver, so the push ends here rather
            // than wake the fan-out task for nothing (a futex wake, ~1 us of the caller's time, when it is idle).
            if count == 0 && !hub.broker().is_clustered() {
                return Ok(0);
            }
            match running.pushes.try_push(push) {
                Ok(()) => return Ok(count),
                Err(NotQueued::Closed) => return Err(not_running()),
                Err(NotQueued::Full(push, sender)) => (count, push, sender),
            }
        };
        // The fan-out is behind by a whole queue: wait for room without the server lock or the GIL.
        py.detach(|| push_queue::wait_for_room(&sender, push)).map_err(|push_queue::Closed| not_running())?;
        Ok(count)
    }

    /// Run a cluster read on the server's runtime with the GIL released (a single node answers at once).
    fn read<T, F, R>(&self, py: Python<'_>, read: R) -> PyResult<T>
    where
        T: Send,
        F: std::future::Future<Output = Result<T, BrokerError>> + Send,
        R: FnOnce(Arc<Hub>) -> F + Send,
    {
        let (hub, runtime) = {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            let server = &running.as_ref().ok_or_else(not_running)?.server;
            (Arc::clone(server.hub()), server.runtime())
        };
        py.detach(|| runtime.block_on(read(hub))).map_err(|error| PyConnectionError::new_err(error.to_string()))
    }
}

#[pymethods]
impl PyServer {
    /// Build from the resolved settings (`fastws.config.Settings.as_dict()`; unknown keys are ignored) and the
    /// hook adapters of `fastws/_hooks.py`.
    #[new]
    #[pyo3(signature = (settings, authenticate = None, authorize = None, on_connect = None, on_disconnect = None))]
    fn new(
        settings: &Bound<'_, PyDict>,
        authenticate: Option<Py<PyAny>>,
        authorize: Option<Py<PyAny>>,
        on_connect: Option<Py<PyAny>>,
        on_disconnect: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let mut config = ServerConfig::default();
        if let Some(v) = setting(settings, "host")? {
            config.host = v;
        }
        if let Some(v) = setting(settings, "port")? {
            config.port = v;
        }
        if let Some(v) = setting(settings, "workers")? {
            config.workers = v;
        }
        if let Some(v) = setting(settings, "max_connections")? {
            config.max_connections = v;
        }
        if let Some(v) = setting(settings, "max_message_size")? {
            config.max_message_size = v;
        }
        if let Some(v) = setting(settings, "max_channels_per_connection")? {
            config.max_channels_per_connection = v;
        }
        if let Some(v) = setting::<Vec<String>>(settings, "client_publish")? {
            config.client_publish = ChannelPatterns::new(&v).map_err(PyValueError::new_err)?;
        }
        if let Some(v) = setting(settings, "heartbeat_interval")? {
            config.heartbeat_interval = seconds(v);
        }
        if let Some(v) = setting(settings, "idle_timeout")? {
            config.idle_timeout = seconds(v);
        }
        if let Some(v) = setting(settings, "handshake_timeout")? {
            config.handshake_timeout = seconds(v);
        }
        if let Some(v) = setting(settings, "max_pending_handshakes")? {
            config.max_pending_handshakes = v;
        }
        if let Some(v) = setting(settings, "backlog")? {
            config.backlog = v;
        }
        if let Some(v) = setting(settings, "rate_limit")? {
            config.rate_limit = v;
        }
        if let Some(v) = setting(settings, "rate_burst")? {
            config.rate_burst = v;
        }
        if let Some(v) = setting(settings, "send_queue_bytes")? {
            config.send_queue_bytes = v;
        }
        if let Some(v) = setting::<Vec<String>>(settings, "allowed_origins")? {
            config.auth.origins = OriginRule::new(&v).map_err(PyValueError::new_err)?;
        }
        config.api_key = setting(settings, "api_key")?;
        config.demo = setting(settings, "demo")?.unwrap_or(false);
        if let Some(v) = setting(settings, "hook_timeout")? {
            config.auth.hook_timeout = seconds(v);
        }
        let jwt = JwtSettings {
            secret: setting(settings, "jwt_secret")?,
            public_key_pem: setting(settings, "jwt_public_key")?,
            algorithms: setting(settings, "jwt_algorithms")?.unwrap_or_default(),
            audience: setting(settings, "jwt_audience")?,
            issuer: setting(settings, "jwt_issuer")?,
            leeway_seconds: setting::<f64>(settings, "jwt_leeway")?.map_or(0, |s| s.max(0.0).ceil() as u64),
            user_claim: setting(settings, "jwt_user_claim")?.unwrap_or_else(|| "sub".to_owned()),
        };
        config.auth.jwt = JwtVerifier::new(&jwt).map_err(PyValueError::new_err)?.map(Arc::new);
        let hooks = PyHooks {
            authenticate: authenticate.map(Arc::new),
            authorize: authorize.map(Arc::new),
            on_connect: on_connect.map(Arc::new),
            on_disconnect: on_disconnect.map(Arc::new),
        };
        if hooks.has_authenticate() || hooks.has_authorize() || hooks.has_lifecycle() {
            config.auth.hooks = Some(Arc::new(hooks));
        }
        if let Some(url) = setting::<String>(settings, "redis_url")? {
            config.redis = Some(RedisSettings {
                url,
                prefix: setting(settings, "redis_prefix")?.unwrap_or_else(|| "fastws".to_owned()),
                node_ttl: seconds(setting(settings, "node_ttl")?.unwrap_or(15.0)),
            });
        }
        crate::bridge::logging::configure(&setting::<String>(settings, "log_level")?.unwrap_or_default());
        Ok(PyServer { config, running: Mutex::new(None) })
    }

    /// Bind and start serving in background threads. Raises OSError when the address cannot be bound, and
    /// ConnectionError when `redis_url` is set and Redis can't be reached.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.is_some() {
            return Err(PyRuntimeError::new_err("this server is already running"));
        }
        let config = self.config.clone();
        let server = py.detach(|| RunningServer::start(config)).map_err(|e| match e {
            StartError::Broker(message) => PyConnectionError::new_err(message),
            StartError::Io(e) => {
                PyOSError::new_err(format!("cannot listen on {}:{}: {e}", self.config.host, self.config.port))
            }
        })?;
        let pushes = PushQueue::start(server.runtime(), Arc::clone(server.hub()));
        *running = Some(Running { server, pushes });
        Ok(())
    }

    /// Deliver the queued pushes, close every connection with 1001 "going away" and wait for the server threads
    /// to end. Idempotent.
    fn stop(&self, py: Python<'_>) {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(Running { mut server, pushes }) = running {
            py.detach(move || {
                pushes.close();
                server.stop();
            });
        }
    }

    /// The JWT algorithms accepted: the configured ones whose key family is configured.
    #[getter]
    fn jwt_algorithms(&self) -> Vec<String> {
        self.config.auth.jwt.as_ref().map(|jwt| jwt.algorithm_names()).unwrap_or_default()
    }

    #[getter]
    fn running(&self) -> bool {
        self.running.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// How this node reaches the others: `memory` (alone) or `redis (<url>, prefix <p>, node <id>)`.
    #[getter]
    fn broker(&self) -> PyResult<String> {
        Ok(self.hub()?.broker().describe())
    }

    /// The bound (host, port); the port is the real one when 0 was asked for.
    #[getter]
    fn address(&self) -> PyResult<(String, u16)> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let addr = running.as_ref().ok_or_else(not_running)?.server.local_addr();
        Ok((addr.ip().to_string(), addr.port()))
    }

    /// Queue `payload` (JSON bytes, or an object for orjson) for the channel's subscribers on every node; returns
    /// how many subscribers this node has for it now (what the fan-out will deliver to unless they leave first).
    #[pyo3(signature = (channel, payload, exclude = None))]
    fn push(
        &self,
        py: Python<'_>,
        channel: &str,
        payload: &Bound<'_, PyAny>,
        exclude: Option<&str>,
    ) -> PyResult<usize> {
        let frame = payload::channel_frame(channel, payload)?;
        let push = Push::Channel { name: channel.into(), frame, exclude: exclude.map(Into::into) };
        self.enqueue(py, push, |hub| hub.audience(channel, exclude))
    }

    fn connection_count(&self) -> PyResult<usize> {
        Ok(self.hub()?.connection_count())
    }

    /// Every channel with subscribers on some node: `[{"name", "type", "subscribers"}]`, sorted by name.
    fn channels<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let stats = self.read(py, |hub| async move { hub.broker().stats(&hub).await })?;
        let list = PyList::empty(py);
        for info in stats.channels {
            list.append(channel_dict(py, &info)?)?;
        }
        Ok(list)
    }

    /// `{"name", "subscribers", "type"}` for one channel; a channel nobody is subscribed to has 0 subscribers.
    fn channel_stats<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        protocol::validate_channel_name(name).map_err(|refusal| PyValueError::new_err(refusal.message))?;
        let info = self.read(py, |hub| async move { hub.broker().channel_info(&hub, name).await })?;
        channel_dict(py, &info)
    }

    /// Queue `payload` (JSON bytes, or an object for orjson) for every connection of a user on every node;
    /// returns how many connections this node has for the user now.
    fn push_to_user(&self, py: Python<'_>, user_id: &str, payload: &Bound<'_, PyAny>) -> PyResult<usize> {
        let push = Push::User { user_id: user_id.into(), frame: payload::delivery_frame(None, payload)? };
        self.enqueue(py, push, |hub| hub.user_audience(user_id))
    }

    /// The members of a presence channel: `[{"id", "info", "connected_at"}]` in arrival order.
    fn presence<'py>(&self, py: Python<'py>, channel: &str) -> PyResult<Bound<'py, PyList>> {
        protocol::validate_channel_name(channel).map_err(|refusal| PyValueError::new_err(refusal.message))?;
        let members = self.read(py, |hub| async move { hub.broker().presence(&hub, channel).await })?;
        json_list(py, members)
    }
}

/// A list of JSON values as Python objects: one json.loads, rather than a walk over serde values here.
pub(crate) fn json_list(py: Python<'_>, values: Vec<serde_json::Value>) -> PyResult<Bound<'_, PyList>> {
    let json = serde_json::Value::Array(values).to_string();
    let loads = py.import("json")?.getattr("loads")?;
    loads.call1((json,))?.cast_into::<PyList>().map_err(Into::into)
}

pub(crate) fn channel_dict<'py>(py: Python<'py>, info: &ChannelInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("name", &info.name)?;
    dict.set_item("subscribers", info.subscribers)?;
    dict.set_item("type", info.kind.as_str())?;
    if let Some(members) = info.members {
        dict.set_item("members", members)?;
    }
    Ok(dict)
}
