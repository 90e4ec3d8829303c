//! `fastws._fastws.RedisPublisher`: pushing into a cluster from a process that runs no server.
//!
//! It wraps [`RedisPublisher`](crate::broker::redis::RedisPublisher), which builds exactly the envelopes the nodes
//! publish, so a push from a script, a worker or a web app reaches every node's subscribers with no HTTP hop.
//! `fastws.Client(redis_url=...)` (client.py) uses it; the stub in `_fastws.pyi` documents it.

use pyo3::exceptions::{PyConnectionError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::bridge::payload;
use crate::bridge::server::{channel_dict, json_list};
use crate::broker::redis::RedisPublisher;
use crate::protocol;

#[pyclass(name = "RedisPublisher", module = "fastws._fastws", frozen)]
pub struct PyRedisPublisher {
    inner: RedisPublisher,
}

fn unreachable(message: String) -> PyErr {
    PyConnectionError::new_err(message)
}

#[pymethods]
impl PyRedisPublisher {
    /// `url` as in the `redis_url` setting; `prefix` must be the nodes' `redis_prefix`. Connects on first use.
    #[new]
    #[pyo3(signature = (url, prefix = "fastws"))]
    fn new(url: &str, prefix: &str) -> PyResult<Self> {
        let valid = !prefix.is_empty()
            && prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
        if !valid {
            return Err(PyValueError::new_err(format!(
                "invalid redis prefix {prefix:?}: use only letters, digits and _ . : -"
            )));
        }
        RedisPublisher::new(url, prefix).map(|inner| PyRedisPublisher { inner }).map_err(PyValueError::new_err)
    }

    /// Publish `payload` (JSON bytes, or an object for orjson) to a channel; returns the number of nodes that
    /// received it.
    #[pyo3(signature = (channel, payload, exclude = None))]
    fn push(
        &self,
        py: Python<'_>,
        channel: &str,
        payload: &Bound<'_, PyAny>,
        exclude: Option<&str>,
    ) -> PyResult<usize> {
        let frame = payload::channel_frame(channel, payload)?;
        py.detach(|| self.inner.publish(channel, frame.as_str(), exclude)).map_err(unreachable)
    }

    /// Push `payload` (JSON bytes, or an object for orjson) to a user's connections on every node; returns the
    /// number of nodes reached.
    fn push_to_user(&self, py: Python<'_>, user_id: &str, payload: &Bound<'_, PyAny>) -> PyResult<usize> {
        let frame = payload::delivery_frame(None, payload)?;
        py.detach(|| self.inner.push_to_user(user_id, frame.as_str())).map_err(unreachable)
    }

    /// The members of a presence channel across the cluster, in arrival order.
    fn presence<'py>(&self, py: Python<'py>, channel: &str) -> PyResult<Bound<'py, PyList>> {
        protocol::validate_channel_name(channel).map_err(|refusal| PyValueError::new_err(refusal.message))?;
        let members = py.detach(|| self.inner.presence(channel)).map_err(unreachable)?;
        json_list(py, members)
    }

    /// One channel's cluster-wide counts.
    fn channel_stats<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        protocol::validate_channel_name(name).map_err(|refusal| PyValueError::new_err(refusal.message))?;
        let info = py.detach(|| self.inner.channel_info(name)).map_err(unreachable)?;
        channel_dict(py, &info)
    }

    /// Every channel with a subscriber on some node, sorted by name.
    fn channels<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let stats = py.detach(|| self.inner.stats()).map_err(unreachable)?;
        let list = PyList::empty(py);
        for info in &stats.channels {
            list.append(channel_dict(py, info)?)?;
        }
        Ok(list)
    }

    /// `{"connections", "nodes": [{"id", "address", "connections"}]}` of the whole cluster.
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = py.detach(|| self.inner.stats()).map_err(unreachable)?;
        let nodes = PyList::empty(py);
        for node in &stats.nodes {
            let entry = PyDict::new(py);
            entry.set_item("id", &node.id)?;
            entry.set_item("address", &node.address)?;
            entry.set_item("connections", node.connections)?;
            nodes.append(entry)?;
        }
        let dict = PyDict::new(py);
        dict.set_item("connections", stats.connections)?;
        dict.set_item("nodes", nodes)?;
        Ok(dict)
    }
}
