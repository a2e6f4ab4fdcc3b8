//! Who may send which requests to a chunk server.
//!
//! Over TLS every connection carries the identity its certificate proved,
//! and each request is checked against the caller's role. The unix socket
//! is reachable only from this machine and its file permissions decide;
//! a server started `--insecure` trusts every caller.

use ballast_proto::frame::Opcode;
use ballast_tls::{Identity, Role};

/// The other end of a connection.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The unix socket, or a TCP connection to a server without TLS.
    Unauthenticated,
    /// A TLS connection and the identity its certificate names.
    Certified(Identity),
}

impl Caller {
    /// The role a refusal is counted under.
    pub fn role_label(&self) -> &'static str {
        match self {
            Caller::Unauthenticated => "none",
            Caller::Certified(identity) => identity.role.name(),
        }
    }
}

/// Whether `caller` may send `opcode`.
pub fn allowed(caller: &Caller, opcode: Opcode) -> bool {
    match caller {
        Caller::Unauthenticated => true,
        Caller::Certified(identity) => role_allows(identity.role, opcode),
    }
}

fn role_allows(role: Role, opcode: Opcode) -> bool {
    match role {
        // Repair, fencing and reconciliation; `ballast` for operators.
        Role::Meta | Role::Admin => true,
        // Volume engines (nodes) and snapshots (controller): the volume
        // data and its chunks, not fencing a volume or surveying the server.
        Role::Node | Role::Controller => !matches!(opcode, Opcode::VolumeFence | Opcode::ListChunks | Opcode::Scrub),
        // Chunk servers never call each other.
        Role::Storage => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller::Certified(Identity::new(role, "x").unwrap())
    }

    #[test]
    fn nodes_read_and_write_but_do_not_fence_or_survey() {
        for op in [Opcode::Read, Opcode::Write, Opcode::Flush, Opcode::ChunkCreate, Opcode::ChunkClone] {
            assert!(allowed(&caller(Role::Node), op), "{op:?}");
        }
        for op in [Opcode::VolumeFence, Opcode::ListChunks, Opcode::Scrub] {
            assert!(!allowed(&caller(Role::Node), op), "{op:?}");
            assert!(allowed(&caller(Role::Meta), op), "{op:?}");
        }
    }

    #[test]
    fn chunk_servers_send_nothing() {
        assert!(Opcode::ALL.iter().all(|op| !allowed(&caller(Role::Storage), *op)));
    }
}
