//! A push payload from Python → the frame its recipients get, built once per push.
//!
//! Why in Rust: `push()` is the API's hot path. A dict is serialised by orjson (called from here, so the payload
//! crosses into native code once) and its top-level keys are looked up in the dict itself, so the frame is built
//! by copying orjson's output, never by parsing it back ([`protocol::encode_known_delivery`]). Bytes are JSON text
//! from the caller: parsed, to refuse what is not JSON ([`protocol::encode_publication`]).

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView};
use tungstenite::Utf8Bytes;

use crate::protocol::{self, KnownShape, Origin};

static ORJSON_DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// The frame for a push of `payload` to `channel` (a user push when None): `bytes`, `bytearray` and `memoryview`
/// are JSON text; anything else is serialised by `orjson.dumps` (whose TypeError propagates).
pub fn delivery_frame(channel: Option<&str>, payload: &Bound<'_, PyAny>) -> PyResult<Utf8Bytes> {
    let py = payload.py();
    if let Ok(bytes) = payload.cast::<PyBytes>() {
        return from_json_text(channel, bytes.as_bytes());
    }
    if payload.is_instance_of::<PyByteArray>() || payload.is_instance_of::<PyMemoryView>() {
        let bytes = py.get_type::<PyBytes>().call1((payload,))?;
        return from_json_text(channel, bytes.cast::<PyBytes>()?.as_bytes());
    }
    let shape = match payload.cast::<PyDict>() {
        Ok(dict) if dict.contains(intern!(py, "event"))? => {
            // Both keys: the payload's "channel" must be dropped from the middle of the object, so parse it.
            (!dict.contains(intern!(py, "channel"))?).then_some(KnownShape::EventObject)
        }
        _ => Some(KnownShape::Data),
    };
    let dumps = ORJSON_DUMPS.get_or_try_init(py, || py.import("orjson")?.getattr("dumps").map(Bound::unbind))?;
    let json = dumps.bind(py).call1((payload,))?;
    let json = json.cast::<PyBytes>()?.as_bytes();
    match shape {
        // orjson writes UTF-8 JSON with no whitespace around it: what encode_known_delivery requires.
        Some(shape) => Ok(protocol::encode_known_delivery(channel, utf8(json)?, shape)),
        None => from_json_text(channel, json),
    }
}

/// The frame for a push to `channel`, after checking the channel's name (ValueError with the protocol's message).
pub fn channel_frame(channel: &str, payload: &Bound<'_, PyAny>) -> PyResult<Utf8Bytes> {
    protocol::validate_channel_name(channel).map_err(|refusal| PyValueError::new_err(refusal.message))?;
    delivery_frame(Some(channel), payload)
}

fn from_json_text(channel: Option<&str>, json: &[u8]) -> PyResult<Utf8Bytes> {
    let json = utf8(json)?;
    let frame = match channel {
        Some(channel) => protocol::encode_publication(channel, json, Origin::Server),
        None => protocol::encode_user_push(json),
    };
    frame.map_err(|e| PyValueError::new_err(e.to_string()))
}

fn utf8(payload: &[u8]) -> PyResult<&str> {
    std::str::from_utf8(payload).map_err(|e| PyValueError::new_err(format!("the payload is not UTF-8: {e}")))
}
