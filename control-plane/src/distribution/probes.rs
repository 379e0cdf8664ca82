//! Segmentation tests (`sidewall verify segmentation`): the run in progress (one at a time),
//! the probe orders waiting for each source sidecar's watch, and the answers that come back.

use std::collections::HashMap;

use sidewall_policies::wire::report::Verification;
use sidewall_policies::wire::{Probe, ProbeAnswer, ProbeResult};

use super::{Distribution, lock};

/// A run, with when its time is up and whether its end was recorded.
pub(super) struct Run {
    pub(super) verification: Verification,
    pub(super) deadline: i64,
    pub(super) recorded: bool,
}

impl Distribution {
    /// Starts `verification`, with `orders` (by source instance) for the watches to carry, due
    /// by `deadline` (Unix seconds); refused while another run is under way.
    pub fn start_verification(
        &self,
        verification: Verification,
        orders: HashMap<String, Vec<Probe>>,
        deadline: i64,
        now: i64,
    ) -> Result<(), String> {
        let mut run = lock(&self.verification);
        if let Some(current) = run.as_ref()
            && !current.verification.finished
            && now < current.deadline
        {
            return Err(current.verification.id.clone());
        }
        *run = Some(Run {
            verification,
            deadline,
            recorded: false,
        });
        *lock(&self.probe_orders) = orders;
        self.probes_changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes whenever probe orders are waiting.
    pub fn subscribe_probes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.probes_changed.subscribe()
    }

    /// The probes waiting for `instance`'s watch, taken.
    pub fn take_probes(&self, instance: &str) -> Option<Vec<Probe>> {
        lock(&self.probe_orders).remove(instance)
    }

    /// Records what the targets answered to `identity`'s probes: only pairs of the run in
    /// progress with that source, still pending; anything else is ignored. How many were taken.
    pub fn probe_results(&self, identity: &str, results: &[ProbeResult]) -> usize {
        let mut run = lock(&self.verification);
        let Some(run) = run.as_mut().filter(|r| !r.verification.finished) else {
            return 0;
        };
        let mut taken = 0;
        for result in results {
            if result.probe.run != run.verification.id || result.answer == ProbeAnswer::Pending {
                continue;
            }
            let pair = run.verification.pairs.iter_mut().find(|p| {
                p.answer == ProbeAnswer::Pending
                    && p.source == identity
                    && p.target == result.probe.target
                    && p.endpoint == result.probe.endpoint
                    && p.port == result.probe.port
            });
            if let Some(pair) = pair {
                pair.answer = result.answer;
                taken += 1;
            }
        }
        taken
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
