//! The Ballast CSI plugin: Kubernetes volumes as Ballast volumes.
//!
//! - [`identity`], [`controller`], [`node`]: the three CSI services;
//!   [`group_controller`]: snapshots of several volumes at one instant.
//! - [`params`]: StorageClass parameters and capacity ranges;
//!   [`capability`]: which access types and modes are served.
//! - [`error`]: every failure and its gRPC status.
//! - [`server`]: the unix socket and the tonic server; [`metrics`]: the
//!   Prometheus metrics and the span every call runs in.
//! - [`kubelet_registration`]: how the kubelet finds the node plugin
//!   (`authority`: the request rewrite its gRPC client needs);
//!   [`liveness`]: the `/healthz` answer, from the plugin's own Probe.

mod authority;
pub mod capability;
pub mod controller;
pub mod error;
pub mod group_controller;
pub mod health;
pub mod identity;
mod inflight;
pub mod kubelet_registration;
pub mod liveness;
pub mod metrics;
pub mod node;
pub mod params;
pub mod server;

pub use error::CsiError;
pub use identity::DRIVER_NAME;
pub use server::{serve, Config, Mode, ServerError};
