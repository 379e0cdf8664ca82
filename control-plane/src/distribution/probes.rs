//! Segmentation tests (`sidewall verify segmentation`): the run in progress (one at a time),
//! the probe orders waiting for each source sidecar's watch, and the answers that come back.
//!
//! With a replicated store a run is shared ([`SharedRun`]): the replica that starts it stores
//! it, every other replica installs it ([`Distribution::install_shared_run`]) so that the
//! sources connected there get their orders, and stores the answers its sidecars post; the
//! starting replica merges them ([`Distribution::merge_answers`]) when the run is read.

use std::collections::HashMap;

use sidewall_policies::wire::report::{Verification, VerificationPair};
use sidewall_policies::wire::{Probe, ProbeAnswer, ProbeOrder, ProbeResult};

use super::{Distribution, lock};

/// A run, with when its time is up and whether its end was recorded.
pub(super) struct Run {
    pub(super) verification: Verification,
    pub(super) deadline: i64,
    pub(super) recorded: bool,
}

/// A run as the store shares it with the other replicas.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedRun {
    /// The run as it started.
    pub verification: Verification,
    /// When its time is up, Unix seconds.
    pub deadline: i64,
    /// The replica that started it (and records it).
    pub replica: String,
}

/// The orders of `pairs`, by source instance.
fn orders_of(run: &str, pairs: &[VerificationPair]) -> HashMap<String, Vec<Probe>> {
    let mut orders: HashMap<String, Vec<Probe>> = HashMap::new();
    for pair in pairs {
        orders
            .entry(pair.instance.clone())
            .or_default()
            .push(Probe {
                run: run.to_owned(),
                target: pair.target.clone(),
                endpoint: pair.endpoint.clone(),
                port: pair.port,
            });
    }
    orders
}

impl Distribution {
    /// The run under way at `now`, if any (its id).
    pub fn verification_running(&self, now: i64) -> Option<String> {
        let mut run = lock(&self.verification);
        let run = run.as_mut()?;
        finish_if_due(run, now);
        (!run.verification.finished).then(|| run.verification.id.clone())
    }

    /// Starts `verification`, with `orders` (by source instance) for the watches to carry, due
    /// by `deadline` (Unix seconds); refused while another run is under way. The run it
    /// replaces, if that finished without being recorded (the caller records it).
    pub fn start_verification(
        &self,
        verification: Verification,
        orders: HashMap<String, Vec<Probe>>,
        deadline: i64,
        now: i64,
    ) -> Result<Option<Verification>, String> {
        let mut run = lock(&self.verification);
        let mut unrecorded = None;
        if let Some(current) = run.as_mut() {
            finish_if_due(current, now);
            if !current.verification.finished {
                return Err(current.verification.id.clone());
            }
            if !current.recorded {
                unrecorded = Some(current.verification.clone());
            }
        }
        *run = Some(Run {
            verification,
            deadline,
            recorded: false,
        });
        *lock(&self.probe_orders) = orders;
        self.probes_changed.send_modify(|n| *n += 1);
        Ok(unrecorded)
    }

    /// Installs a run another replica started (once; a run of this replica's own, or one
    /// whose time is up, is left alone), with orders for its sources, so that those connected
    /// here get them. This replica never records it: the one that started it does.
    pub fn install_shared_run(&self, shared: SharedRun, now: i64) -> bool {
        let mut run = lock(&self.verification);
        if run
            .as_ref()
            .is_some_and(|r| r.verification.id == shared.verification.id)
            || now >= shared.deadline
        {
            return false;
        }
        let orders = orders_of(&shared.verification.id, &shared.verification.pairs);
        *run = Some(Run {
            verification: shared.verification,
            deadline: shared.deadline,
            recorded: true,
        });
        *lock(&self.probe_orders) = orders;
        self.probes_changed.send_modify(|n| *n += 1);
        true
    }

    /// The pairs of run `id` answered here, to share with the replica that started it.
    pub fn answered_pairs(&self, id: &str) -> Vec<VerificationPair> {
        lock(&self.verification)
            .as_ref()
            .filter(|r| r.verification.id == id)
            .map(|r| {
                r.verification
                    .pairs
                    .iter()
                    .filter(|p| !matches!(p.answer, ProbeAnswer::Pending | ProbeAnswer::NoAnswer))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes the answers other replicas' sidecars gave to run `id`'s probes, for pairs still
    /// without one here (or given up on at the deadline, until the run is recorded).
    pub fn merge_answers(&self, id: &str, answered: &[VerificationPair]) {
        let mut run = lock(&self.verification);
        let Some(run) = run.as_mut().filter(|r| r.verification.id == id) else {
            return;
        };
        if run.recorded {
            return;
        }
        for theirs in answered {
            if let Some(pair) = run.verification.pairs.iter_mut().find(|p| {
                p.source == theirs.source
                    && p.instance == theirs.instance
                    && p.target == theirs.target
                    && p.endpoint == theirs.endpoint
                    && p.port == theirs.port
                    && matches!(p.answer, ProbeAnswer::Pending | ProbeAnswer::NoAnswer)
            }) {
                pair.answer = theirs.answer;
            }
        }
    }

    /// Changes whenever probe orders are waiting.
    pub fn subscribe_probes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.probes_changed.subscribe()
    }

    /// The probes waiting for `instance`'s watch, taken, with the run's deadline.
    pub fn take_probes(&self, instance: &str) -> Option<ProbeOrder> {
        let probes = lock(&self.probe_orders).remove(instance)?;
        let deadline = lock(&self.verification).as_ref().map(|r| r.deadline);
        Some(ProbeOrder { probes, deadline })
    }

    /// Records what the targets answered to the probes of sidecar `instance` of `identity`:
    /// only pairs of the run under way ordered to that sidecar, still pending; anything else
    /// (an answer after the run's time is up, a second answer) is ignored. How many were
    /// taken, and how many answered probes of the run never ordered to that sidecar (counted
    /// in the run: the caller logs them).
    pub fn probe_results(
        &self,
        identity: &str,
        instance: &str,
        results: &[ProbeResult],
        now: i64,
    ) -> (usize, usize) {
        let mut run = lock(&self.verification);
        let Some(run) = run.as_mut() else {
            return (0, 0);
        };
        finish_if_due(run, now);
        if run.verification.finished {
            return (0, 0);
        }
        let (mut taken, mut unordered) = (0, 0);
        for result in results {
            if result.probe.run != run.verification.id || result.answer == ProbeAnswer::Pending {
                continue;
            }
            let pair = run.verification.pairs.iter_mut().find(|p| {
                p.source == identity
                    && p.instance == instance
                    && p.target == result.probe.target
                    && p.endpoint == result.probe.endpoint
                    && p.port == result.probe.port
            });
            match pair {
                Some(pair) if pair.answer == ProbeAnswer::Pending => {
                    pair.answer = result.answer;
                    taken += 1;
                }
                Some(_) => {}
                None => unordered += 1,
            }
        }
        run.verification.unordered_answers = run
            .verification
            .unordered_answers
            .saturating_add(unordered as u64);
        (taken, unordered)
    }

    /// Run `id` as it stands at `now`, finished when every pair answered or its time is up;
    /// with whether it finished now, unrecorded (the caller records it once).
    pub fn verification(&self, id: &str, now: i64) -> Option<(Verification, bool)> {
        let mut run = lock(&self.verification);
        let run = run.as_mut().filter(|r| r.verification.id == id)?;
        finish_if_due(run, now);
        let record = run.verification.finished && !run.recorded;
        run.recorded |= record;
        Some((run.verification.clone(), record))
    }

    /// The newest run, finished or not, as it stands at `now`.
    pub fn last_verification(&self, now: i64) -> Option<Verification> {
        let mut run = lock(&self.verification);
        let run = run.as_mut()?;
        finish_if_due(run, now);
        Some(run.verification.clone())
    }
}

fn finish_if_due(run: &mut Run, now: i64) {
    let v = &mut run.verification;
    if v.finished {
        return;
    }
    let answered = v.pairs.iter().all(|p| p.answer != ProbeAnswer::Pending);
    if answered || now >= run.deadline {
        for pair in v
            .pairs
            .iter_mut()
            .filter(|p| p.answer == ProbeAnswer::Pending)
        {
            pair.answer = ProbeAnswer::NoAnswer;
        }
        v.finished = true;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sidewall_policies::wire::report::VerificationPair;

    /// A run `run-1` of these pairs, just started.
    fn run_of(pairs: Vec<VerificationPair>) -> Verification {
        Verification {
            id: "run-1".into(),
            started_by: "admin".into(),
            started_at: String::new(),
            policy_version: 1,
            finished: false,
            unprobed: 0,
            pairs,
            unordered_answers: 0,
        }
    }

    fn probe(target: &str) -> Probe {
        Probe {
            run: "run-1".into(),
            target: target.into(),
            endpoint: "10.0.0.7:4643".into(),
            port: 8080,
        }
    }

    /// Only the answer to a pending probe ordered to that sidecar is taken; an answer to a
    /// probe never ordered to it is counted in the run.
    #[test]
    fn answers_to_probes_never_ordered_are_counted_not_taken() {
        let distribution = Distribution::for_tests();
        let source = "spiffe://sidewall.local/batch";
        let verification = run_of(vec![VerificationPair {
            source: source.into(),
            instance: "batch-1".into(),
            target: "spiffe://sidewall.local/api".into(),
            endpoint: "10.0.0.7:4643".into(),
            port: 8080,
            answer: ProbeAnswer::Pending,
        }]);
        distribution
            .start_verification(verification, HashMap::new(), 1_000, 0)
            .unwrap();
        let answer = |target: &str, instance: &str| {
            distribution.probe_results(
                source,
                instance,
                &[ProbeResult {
                    probe: probe(target),
                    answer: ProbeAnswer::Refused,
                }],
                1,
            )
        };
        assert_eq!(answer("spiffe://sidewall.local/web", "batch-1"), (0, 1));
        assert_eq!(answer("spiffe://sidewall.local/api", "batch-2"), (0, 1));
        assert_eq!(answer("spiffe://sidewall.local/api", "batch-1"), (1, 0));
        // A second answer to the same probe is neither taken nor unordered.
        assert_eq!(answer("spiffe://sidewall.local/api", "batch-1"), (0, 0));
        let (run, _) = distribution.verification("run-1", 2).unwrap();
        assert_eq!(run.unordered_answers, 2);
        assert!(run.finished);
    }

    /// A run another replica started: installed once with its orders, never recorded here;
    /// the answers given here are what the starting replica merges, pending pairs only.
    #[test]
    fn a_shared_run_is_installed_answered_here_and_merged_there() {
        let pair = |instance: &str, target: &str| VerificationPair {
            source: "spiffe://sidewall.local/web".into(),
            instance: instance.into(),
            target: target.into(),
            endpoint: "10.0.0.7:4643".into(),
            port: 8080,
            answer: ProbeAnswer::Pending,
        };
        let verification = run_of(vec![
            pair("web-1", "spiffe://sidewall.local/api"),
            pair("web-1", "spiffe://sidewall.local/db"),
        ]);
        let shared = SharedRun {
            verification: verification.clone(),
            deadline: 100,
            replica: "https://a".into(),
        };
        // Here: replica b.
        let here = Distribution::for_tests();
        assert!(
            !here.install_shared_run(shared.clone(), 100),
            "its time is up"
        );
        assert!(here.install_shared_run(shared.clone(), 1));
        assert!(!here.install_shared_run(shared, 2), "installed once");
        assert_eq!(here.take_probes("web-1").unwrap().probes.len(), 2);
        let result = ProbeResult {
            probe: probe("spiffe://sidewall.local/api"),
            answer: ProbeAnswer::Admitted,
        };
        assert_eq!(
            here.probe_results("spiffe://sidewall.local/web", "web-1", &[result], 3),
            (1, 0)
        );
        let answered = here.answered_pairs("run-1");
        assert_eq!(answered.len(), 1);
        // Not recorded here, even once finished.
        assert!(matches!(here.verification("run-1", 200), Some((_, false))));

        // There: replica a, which started it.
        let there = Distribution::for_tests();
        there
            .start_verification(verification, HashMap::new(), 100, 0)
            .unwrap();
        there.merge_answers("run-1", &answered);
        there.merge_answers("other-run", &answered);
        let (run, _) = there.verification("run-1", 4).unwrap();
        assert_eq!(run.pairs[0].answer, ProbeAnswer::Admitted);
        assert_eq!(run.pairs[1].answer, ProbeAnswer::Pending);
        assert!(!run.finished);
    }
}
