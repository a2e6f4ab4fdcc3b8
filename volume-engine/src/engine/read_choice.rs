//! Which replica a read tries first: the one expected to answer soonest.
//!
//! Each chunk server's expected read latency is a peak-sensitive moving
//! average (Finagle's "peak EWMA"): a slower answer raises it at once,
//! faster ones lower it gradually, and it decays while the server gets no
//! reads, so a server that was slow is tried again a few seconds later.
//! While reads wait on a server that has answered none of them for longer
//! than its estimate, that wait is its estimate: a server that stalls, or
//! has never answered yet, stops getting reads at once. A server's cost is
//! that latency times its reads in flight plus one. Reads at a high queue
//! depth thus spread over every replica, and a server on an overloaded
//! node, or behind a congested link, gets reads only while its peers are
//! busier still. A read that fails counts as one that took the whole
//! replica timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::chunk_map::Replica;

/// How fast an estimate forgets: the weight of what it knew falls to 1/e
/// over this long.
const MEMORY: Duration = Duration::from_secs(1);
/// The latency assumed of a server that has not answered yet or whose
/// estimate decayed away, so that in-flight counts still spread reads.
const FLOOR_NS: f64 = 10_000.0;

/// Read latency estimates of the servers one volume reads from.
#[derive(Default)]
pub struct ReadChoice {
    servers: Mutex<HashMap<String, Estimate>>,
}

struct Estimate {
    latency_ns: f64,
    updated: Instant,
    in_flight: u32,
    /// Since when the reads in flight have waited without any answer.
    waiting_since: Instant,
}

impl Estimate {
    fn new(now: Instant) -> Estimate {
        Estimate { latency_ns: 0.0, updated: now, in_flight: 0, waiting_since: now }
    }

    fn start(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.waiting_since = now;
        }
        self.in_flight += 1;
    }

    /// How long the reads in flight have gone unanswered.
    fn stalled_ns(&self, now: Instant) -> f64 {
        match self.in_flight {
            0 => 0.0,
            _ => now.saturating_duration_since(self.waiting_since).as_nanos() as f64,
        }
    }

    /// The weight the current estimate keeps at `now`.
    fn retained(&self, now: Instant) -> f64 {
        (-now.saturating_duration_since(self.updated).as_secs_f64() / MEMORY.as_secs_f64()).exp()
    }

    fn cost(&self, now: Instant) -> f64 {
        let latency = (self.latency_ns * self.retained(now)).max(self.stalled_ns(now)).max(FLOOR_NS);
        latency * f64::from(self.in_flight + 1)
    }

    fn observe(&mut self, sample_ns: f64, now: Instant) {
        let kept = self.retained(now);
        self.latency_ns =
            if sample_ns > self.latency_ns { sample_ns } else { self.latency_ns * kept + sample_ns * (1.0 - kept) };
        self.updated = now;
        self.waiting_since = now;
    }
}

impl ReadChoice {
    /// Orders `replicas` by expected answer time, soonest first; equal
    /// costs keep their order.
    pub fn order(&self, replicas: &mut [Replica]) {
        let now = Instant::now();
        let servers = self.servers.lock().expect("read choice lock");
        let cost = |r: &Replica| servers.get(&r.server_id).map_or(FLOOR_NS, |e| e.cost(now));
        replicas.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
    }

    /// Counts a read of `server` in flight until the returned guard goes.
    pub fn start<'a>(&'a self, server: &'a str) -> PendingRead<'a> {
        let now = Instant::now();
        let mut servers = self.servers.lock().expect("read choice lock");
        match servers.get_mut(server) {
            Some(estimate) => estimate.start(now),
            None => servers.entry(server.to_string()).or_insert_with(|| Estimate::new(now)).start(now),
        }
        PendingRead { choice: self, server, started: now, ended: false }
    }
}

/// One read in flight on one server.
pub struct PendingRead<'a> {
    choice: &'a ReadChoice,
    server: &'a str,
    started: Instant,
    /// Taken out of the in-flight count already.
    ended: bool,
}

impl PendingRead<'_> {
    /// The server answered (data or a refusal): its latency counts.
    pub fn answered(mut self) {
        let now = Instant::now();
        let latency = now.duration_since(self.started);
        self.leave(Some((latency, now)));
    }

    /// The server failed to answer: counted as taking `penalty`.
    pub fn failed(mut self, penalty: Duration) {
        self.leave(Some((penalty, Instant::now())));
    }

    /// Leaves the in-flight count (once), recording `sample` (latency,
    /// when) if there is one.
    fn leave(&mut self, sample: Option<(Duration, Instant)>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        if let Some(estimate) = self.choice.servers.lock().expect("read choice lock").get_mut(self.server) {
            estimate.in_flight -= 1;
            if let Some((latency, now)) = sample {
                estimate.observe(latency.as_nanos() as f64, now);
            }
        }
    }
}

/// A read abandoned before it ended (its caller gave up) leaves no sample.
impl Drop for PendingRead<'_> {
    fn drop(&mut self) {
        self.leave(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str) -> Replica {
        Replica { server_id: id.into(), address: format!("{id}:1") }
    }

    fn first(choice: &ReadChoice) -> String {
        let mut replicas = vec![replica("a"), replica("b"), replica("c")];
        choice.order(&mut replicas);
        replicas[0].server_id.clone()
    }

    fn answered_in(choice: &ReadChoice, server: &str, latency: Duration) {
        let mut pending = choice.start(server);
        let answered_at = pending.started + latency;
        pending.leave(Some((latency, answered_at)));
    }

    #[test]
    fn a_server_never_asked_keeps_its_place() {
        assert_eq!(first(&ReadChoice::default()), "a");
    }

    #[test]
    fn reads_in_flight_spread_over_equal_servers() {
        let choice = ReadChoice::default();
        let _a = choice.start("a");
        assert_eq!(first(&choice), "b");
        let _b = choice.start("b");
        assert_eq!(first(&choice), "c");
    }

    #[test]
    fn a_slow_answer_moves_the_server_to_the_back_at_once() {
        let choice = ReadChoice::default();
        for server in ["b", "c"] {
            answered_in(&choice, server, Duration::from_micros(200));
        }
        answered_in(&choice, "a", Duration::from_millis(50));
        let mut replicas = vec![replica("a"), replica("b"), replica("c")];
        choice.order(&mut replicas);
        assert_eq!(replicas.last().unwrap().server_id, "a");
    }

    #[test]
    fn a_server_that_leaves_reads_unanswered_costs_at_least_the_wait() {
        let mut estimate = Estimate::new(Instant::now());
        let then = estimate.updated;
        estimate.observe(100e3, then);
        estimate.start(then);
        let later = then + Duration::from_millis(20);
        assert!(estimate.cost(later) >= 2.0 * 20e6, "{}", estimate.cost(later));
        // An answer ends the wait.
        estimate.observe(100e3, later);
        assert!(estimate.cost(later) < 1e6);
    }

    #[test]
    fn an_abandoned_read_leaves_the_count_without_a_sample() {
        let choice = ReadChoice::default();
        drop(choice.start("a"));
        let servers = choice.servers.lock().unwrap();
        assert_eq!(servers["a"].in_flight, 0);
        assert_eq!(servers["a"].latency_ns, 0.0);
    }

    #[test]
    fn a_failed_read_counts_as_slow() {
        let choice = ReadChoice::default();
        answered_in(&choice, "b", Duration::from_micros(200));
        choice.start("a").failed(Duration::from_secs(5));
        assert_eq!(first(&choice), "c");
    }

    #[test]
    fn a_slow_server_is_tried_again_once_its_estimate_decays() {
        let mut estimate = Estimate::new(Instant::now());
        let then = estimate.updated;
        estimate.observe(50e6, then);
        assert!(estimate.cost(then) >= 50e6);
        // Ten memories later the 50 ms are forgotten down to the floor.
        assert_eq!(estimate.cost(then + MEMORY * 10), FLOOR_NS);
    }

    #[test]
    fn faster_answers_lower_the_estimate_gradually() {
        let mut estimate = Estimate::new(Instant::now());
        let then = estimate.updated;
        estimate.observe(1e6, then);
        estimate.observe(100e3, then + MEMORY);
        let after = estimate.latency_ns;
        assert!(after < 1e6 && after > 100e3, "{after}");
    }
}
