//! Every wire format Ballast speaks.
//!
//! - [`csi`]: the Container Storage Interface (package `csi.v1`), spoken to
//!   Kubernetes sidecars and the kubelet.
//! - [`meta`]: the metadata service API and the Raft transport between members.
//! - [`pluginregistration`]: the kubelet's plugin registration API, which
//!   the node plugin serves so that the kubelet finds its CSI socket.
//! - [`frame`]: the binary data-plane protocol between volume engines and
//!   chunk servers.
//! - [`range_lock`]: the byte range lock both ends of it order writes with.
//! - [`size`]: byte counts as flags and Kubernetes quantities write them.
//! - [`volume`]: the limits of a volume's shape and of listings.

pub mod csi {
    tonic::include_proto!("csi.v1");
}

pub mod meta {
    tonic::include_proto!("ballast.meta.v1");
}

pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

pub mod frame;
pub mod range_lock;
pub mod size;
pub mod volume;
