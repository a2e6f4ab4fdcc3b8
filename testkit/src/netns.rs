//! Network namespaces joined by a bridge, for tests that cut the network
//! between groups of daemons while this process still reaches them all.
//!
//! Each group gets a namespace with one address on a private /24; this
//! process (the root namespace) holds `.1` on the bridge. [`Network::cut`]
//! makes each side resolve the other's address to a hardware address no
//! one has: their packets vanish on the bridge, as in a real partition
//! (no error, no reset; TCP times out), while both sides still reach this
//! process. [`Network::heal`] forgets those entries.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

/// A hardware address that no interface on the bridge has.
const NOWHERE: &str = "02:00:00:00:00:01";
/// The interface name inside every namespace.
const INSIDE: &str = "eth0";
/// Networks created by this process so far: tests of one binary run in
/// parallel, and each needs names and a subnet of its own.
static CREATED: AtomicU8 = AtomicU8::new(0);

pub struct Network {
    tag: String,
    subnet: [u8; 3],
    groups: Vec<String>,
}

/// Runs `ip` with `args`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(output.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
}

impl Network {
    /// Creates one namespace per group (`meta`, `storage`, ...). Needs
    /// root and `ip`. Everything is removed when dropped.
    pub fn create(groups: &[&str]) -> Network {
        let pid = std::process::id();
        let n = CREATED.fetch_add(1, Ordering::SeqCst);
        let network = Network {
            tag: format!("b{}n{n}", pid % 10_000),
            subnet: [10, 200 + n % 50, (pid % 250) as u8],
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        let bridge = network.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", network.root_address()), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, group) in groups.iter().enumerate() {
            let ns = network.namespace(group);
            let outside = format!("{}v{i}", network.tag);
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", INSIDE, "netns", &ns]);
            ip(&["link", "set", &outside, "master", &bridge, "up"]);
            let address = format!("{}/24", network.address(group));
            ip(&["-n", &ns, "addr", "add", &address, "dev", INSIDE]);
            ip(&["-n", &ns, "link", "set", INSIDE, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        network
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    fn index(&self, group: &str) -> usize {
        self.groups.iter().position(|g| g == group).unwrap_or_else(|| panic!("no group {group}"))
    }

    /// The namespace of `group`, as `ip netns` names it.
    pub fn namespace(&self, group: &str) -> String {
        format!("ballast-{}-{group}", self.tag)
    }

    /// The address of `group`'s namespace.
    pub fn address(&self, group: &str) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 2 + self.index(group) as u8)
    }

    /// This process's address on the bridge.
    pub fn root_address(&self) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Packets between groups `a` and `b` are lost from now on.
    pub fn cut(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            let to = self.address(to).to_string();
            let ns = self.namespace(from);
            ip(&["-n", &ns, "neigh", "replace", &to, "lladdr", NOWHERE, "dev", INSIDE, "nud", "permanent"]);
        }
    }

    /// Groups `a` and `b` reach each other again.
    pub fn heal(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            let to = self.address(to).to_string();
            ip(&["-n", &self.namespace(from), "neigh", "del", &to, "dev", INSIDE]);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // A namespace's end of a veth pair takes the other end with it.
        for group in &self.groups {
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(group)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).status();
    }
}
