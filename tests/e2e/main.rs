//! End-to-end tests: the real `spanlake` binary, driven by real clients.

mod basics;
mod crash;
mod dashboards;
mod durability;
mod flight;
mod harness;
mod lifecycle;
mod postgres;
mod replay;
mod sdk_export;
mod security;
mod traceviews;
