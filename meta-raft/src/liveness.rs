//! Which chunk servers the repair loop may give up for silence.
//!
//! Silence is judged on this member's monotonic clock, from when it saw
//! each server's heartbeat stamp change, never by comparing wall-clock
//! stamps (another member's clock, or this one's before a jump). A member
//! that just became leader, or that was frozen, has heard nothing yet: it
//! waits a full repair delay before anything counts as silent. And when
//! half the servers or more are silent at once, the metadata side is the
//! one cut off (a partition, a stalled disk): nobody is given up. Ceph's
//! monitors hold back in the same way (`mon_osd_min_in_ratio`). When the
//! cut heals, listening starts afresh: the servers heard last are a
//! heartbeat behind, not dead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::model::ChunkServer;

pub struct Liveness {
    dead_after: Duration,
    /// A gap between passes longer than this means this member was frozen.
    max_gap: Duration,
    /// Since when this member has been listening as leader.
    listening_since: Option<Instant>,
    last_pass: Option<Instant>,
    /// Per server: the newest heartbeat stamp seen, and when it was seen first.
    heard: HashMap<String, (u64, Instant)>,
    holding_back: bool,
}

impl Liveness {
    pub fn new(dead_after: Duration, interval: Duration) -> Self {
        Liveness {
            dead_after,
            max_gap: interval + interval.max(Duration::from_secs(1)),
            listening_since: None,
            last_pass: None,
            heard: HashMap::new(),
            holding_back: false,
        }
    }

    /// This member does not lead: what it heard is stale when it leads again.
    pub fn forget(&mut self) {
        self.listening_since = None;
        self.last_pass = None;
        self.heard.clear();
    }

    /// Takes in the heartbeat stamps of the applied state at the start of
    /// a pass; returns the servers silent for longer than the repair delay
    /// (none when half of them or more are).
    pub fn silent(&mut self, now: Instant, servers: &BTreeMap<String, ChunkServer>) -> BTreeSet<String> {
        if self.last_pass.is_none_or(|last| now.saturating_duration_since(last) > self.max_gap) {
            // New leader, or thawed: start listening afresh.
            self.listening_since = Some(now);
            self.heard.clear();
        }
        self.last_pass = Some(now);
        let since = self.listening_since.unwrap_or(now);
        for server in servers.values() {
            let stamp = server.last_heartbeat_ms;
            match self.heard.get(&server.id) {
                Some((seen, _)) if *seen == stamp => {}
                _ => {
                    self.heard.insert(server.id.clone(), (stamp, now));
                }
            }
        }
        let quiet_for = |id: &String| {
            let heard_at = self.heard.get(id).map_or(since, |(_, at)| (*at).max(since));
            now.saturating_duration_since(heard_at)
        };
        let silent: BTreeSet<String> = servers.keys().filter(|id| quiet_for(id) > self.dead_after).cloned().collect();
        // Heartbeats are staggered: in a partition the first server crosses
        // the delay while the others are a beat behind. Servers quiet for
        // half the delay count towards "most of the cluster" already.
        let quiet = servers.keys().filter(|id| quiet_for(id) > self.dead_after / 2).count();
        if !silent.is_empty() && quiet * 2 >= servers.len() {
            if !self.holding_back {
                tracing::error!(
                    silent = silent.len(),
                    servers = servers.len(),
                    "most chunk servers are silent: this side is likely cut off; giving none of them up"
                );
                self.holding_back = true;
            }
            return BTreeSet::new();
        }
        if std::mem::replace(&mut self.holding_back, false) {
            // The cut healed. Heartbeats come back a beat apart, and the
            // last server heard must not be given up for that beat: every
            // server gets a full delay from now.
            tracing::info!("most chunk servers are heard again; listening afresh");
            self.listening_since = Some(now);
            return BTreeSet::new();
        }
        silent
    }

    /// Marks the end of a pass (a long pass is not a freeze).
    pub fn pass_done(&mut self, now: Instant) {
        self.last_pass = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(stamps: &[u64]) -> BTreeMap<String, ChunkServer> {
        stamps
            .iter()
            .enumerate()
            .map(|(i, &stamp)| {
                let server = ChunkServer { last_heartbeat_ms: stamp, ..ChunkServer::new(format!("s{i}")) };
                (server.id.clone(), server)
            })
            .collect()
    }

    #[test]
    fn silence_counts_from_when_this_leader_listens_and_never_for_most_servers() {
        let (dead_after, interval) = (Duration::from_secs(10), Duration::from_secs(1));
        let mut liveness = Liveness::new(dead_after, interval);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // Stamps from long ago (another member's clock): nothing is silent yet.
        assert!(liveness.silent(at(0), &servers(&[1, 1, 1, 1])).is_empty());
        // s0 stops; the others heartbeat on every pass.
        let mut silent = BTreeSet::new();
        for t in 1..=11 {
            silent = liveness.silent(at(t), &servers(&[1, t, t, t]));
        }
        assert_eq!(silent, BTreeSet::from(["s0".to_string()]));
        // A freeze: the first pass after it starts listening afresh.
        assert!(liveness.silent(at(40), &servers(&[1, 11, 11, 11])).is_empty());
        // Half of the servers silent: this side is cut off, nobody goes.
        for t in 41..=52 {
            silent = liveness.silent(at(t), &servers(&[1, 11, t, t]));
        }
        assert!(silent.is_empty(), "{silent:?}");
        // A partition with staggered heartbeats: s0 has crossed the delay,
        // s1 is half-way there; together they are half the cluster.
        let mut liveness = Liveness::new(dead_after, interval);
        for t in 100..=105 {
            liveness.silent(at(t), &servers(&[100, t, t, t]));
        }
        for t in 106..=111 {
            silent = liveness.silent(at(t), &servers(&[100, 105, t, t]));
        }
        assert!(silent.is_empty(), "{silent:?}");
        // A leader change: whatever the old one heard is forgotten.
        liveness.forget();
        assert!(liveness.silent(at(53), &servers(&[1, 53, 53, 53])).is_empty());
    }

    #[test]
    fn a_healed_partition_gives_every_server_a_full_delay_to_be_heard_again() {
        let (dead_after, interval) = (Duration::from_secs(3), Duration::from_secs(1));
        let mut liveness = Liveness::new(dead_after, interval);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        for t in 0..=2 {
            liveness.silent(at(t), &servers(&[t, t, t, t]));
        }
        // The partition: nobody is heard, nobody is given up.
        for t in 3..=12 {
            assert!(liveness.silent(at(t), &servers(&[2, 2, 2, 2])).is_empty());
        }
        // Healed: heartbeats come back a beat apart; s3's is the last.
        assert!(liveness.silent(at(13), &servers(&[13, 2, 2, 2])).is_empty());
        assert!(liveness.silent(at(14), &servers(&[14, 14, 2, 2])).is_empty());
        let silent = liveness.silent(at(15), &servers(&[15, 15, 15, 2]));
        assert!(silent.is_empty(), "{silent:?} given up a beat after the partition healed");
        assert!(liveness.silent(at(16), &servers(&[16, 16, 16, 16])).is_empty());
        // A server that really stays silent is given up, a full delay later.
        let mut silent = BTreeSet::new();
        for t in 17..=21 {
            silent = liveness.silent(at(t), &servers(&[t, t, t, 16]));
        }
        assert_eq!(silent, BTreeSet::from(["s3".to_string()]));
    }
}
