//! callfleet's integration and end-to-end tests: one test binary (one link) with a module
//! per area. Tests that need RabbitMQ or Redis use the real local services (the test
//! command starts them) and fail loudly when they are unreachable; every test uses its own
//! queue and key prefix so tests run in parallel.

mod api_errors;
mod broker_conformance;
mod callbacks;
mod chaos;
mod control;
mod crash;
mod dead_letters_cli;
mod emulator;
mod event_log_conformance;
mod events;
mod fleet;
mod harness;
mod inbound;
mod lifecycle;
mod livekit_cli;
mod lost_answers;
mod outbound;
mod readme;
mod receiver;
mod routing_conformance;
mod store_conformance;
mod subscription_conformance;
mod sweeper;
mod webhooks;
mod worker_runtime;
