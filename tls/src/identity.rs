//! Roles and identities, as certificates carry them: a SAN URI
//! `spiffe://ballast/<role>/<name>`.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

const URI_PREFIX: &str = "spiffe://ballast/";

/// What a component is allowed to do is decided by its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A metadata member: speaks Raft.
    Meta,
    /// A chunk server: registers and heartbeats as itself, copies chunks.
    Storage,
    /// A node: opens the volumes published to it.
    Node,
    /// The CSI controller: creates, publishes and deletes volumes.
    Controller,
    /// An operator: everything, membership and draining included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Meta, Role::Storage, Role::Node, Role::Controller, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Storage => "storage",
            Role::Node => "node",
            Role::Controller => "controller",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
            format!("unknown role {s:?} (one of {})", names.join(", "))
        })
    }
}

/// A component: its role and its name within the role (a member id, a
/// server id, a node name, an operator's name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// Names are what the cluster calls the component: letters, digits,
    /// `-`, `_` and `.`, at most 128.
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, TlsError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(TlsError::Certificate(format!(
                "invalid name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self { role, name })
    }

    /// `spiffe://ballast/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    pub fn from_uri(uri: &str) -> Option<Self> {
        let (role, name) = uri.strip_prefix(URI_PREFIX)?.split_once('/')?;
        Identity::new(role.parse().ok()?, name).ok()
    }

    /// The identity a certificate (DER) names; a certificate that names
    /// none, or two, names nobody.
    pub fn of_certificate(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::Certificate(format!("cannot parse the certificate: {e}")))?;
        let mut found = Vec::new();
        if let Ok(Some(names)) = cert.subject_alternative_name() {
            for name in &names.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if uri.starts_with(URI_PREFIX) {
                        found.push(*uri);
                    }
                }
            }
        }
        match found.as_slice() {
            [uri] => Identity::from_uri(uri)
                .ok_or_else(|| TlsError::Certificate(format!("{uri} is not spiffe://ballast/<role>/<name>"))),
            [] => Err(TlsError::Certificate("the certificate names no Ballast identity (SAN URI)".into())),
            _ => Err(TlsError::Certificate("the certificate names more than one Ballast identity".into())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_nobody() {
        let storage = Identity::new(Role::Storage, "srv-1").unwrap();
        assert_eq!(storage.uri(), "spiffe://ballast/storage/srv-1");
        assert_eq!(Identity::from_uri(&storage.uri()), Some(storage));
        for bad in
            ["spiffe://ballast/root/x", "spiffe://other/node/a", "spiffe://ballast/node/", "spiffe://ballast/node/a/b"]
        {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
        assert!(Identity::new(Role::Node, "a b").is_err());
        assert!("superuser".parse::<Role>().unwrap_err().contains("one of meta, storage"));
    }
}
