//! callfleet's workers: a bounded, draining consumer runtime over the broker port, and the
//! job handlers that run on it.

pub mod runtime;

pub use runtime::{Handler, HandlerOutcome, WorkerRuntime};
