//! Tests of the core with fake sources and tokio's paused clock.
//!
//! Every test runs on tokio's paused clock: time only moves when every task is idle
//! (it then jumps to the next timer), so the call times the fakes record are exact and
//! nothing depends on the wall clock.

mod cache;
mod chain;
mod explain;
mod fake;
mod registration;
mod reload;
