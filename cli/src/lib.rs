//! The `ballast` admin command's library: the local development cluster
//! ([`dev`]), what chunk servers hold ([`chunks`]), the certificate
//! authority ([`pki`]), human sizes ([`size`]) and output formatting
//! ([`output`]).
//! Tests of other crates start clusters through [`dev`].

pub mod chunks;
pub mod dev;
pub mod output;
pub mod pki;
pub mod size;
