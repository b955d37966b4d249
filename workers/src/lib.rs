//! callfleet's workers: a bounded, draining consumer runtime over the broker port, and the
//! job handlers that run on it (outbound call jobs, LiveKit webhook events).

pub mod callbacks;
pub mod calls;
pub mod control;
pub mod events;
pub mod inbound;
pub mod outbound;
pub mod runtime;
pub mod steps;
pub mod sweeper;

pub use callbacks::{CallbackHandler, CallbackSettings, Dispatcher};
pub use calls::{CallDeps, OutboundSettings};
pub use control::ControlHandler;
pub use events::WebhookEventHandler;
pub use inbound::{Inbound, InboundSettings};
pub use outbound::OutboundCallHandler;
pub use runtime::{Handler, HandlerOutcome, WorkerRuntime};
pub use sweeper::{SweepSettings, Sweeper};
