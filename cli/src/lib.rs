//! The `ballast` admin command's library: the local development cluster
//! ([`dev`]), what chunk servers hold ([`chunks`]), the certificate
//! authority ([`pki`]) and output formatting ([`output`]).
//! Tests of other crates start clusters through [`dev`].

pub mod chunks;
pub mod dev;
pub mod output;
pub mod pki;
