//! Detection: signals in what the sidecars report that point at lateral movement or a
//! compromised workload. Each alert is counted (`sidewall_control_plane_alerts_total{signal}`),
//! logged as a structured event with a stable `event` name (`sidewall.alert.<signal>`, for
//! SIEM rules) and kept for the dashboard's Alerts panel.
//!
//! | signal | fires when |
//! |---|---|
//! | `denial_burst` | one peer was denied at one target more than `detection.denials` times within `detection.window` |
//! | `new_edge` | a peer reached (or tried to reach) a target it was never seen reaching, once `detection.baseline` after start has passed |
//! | `path_scan` | one peer was denied at one target on `detection.scanPaths` or more distinct HTTP paths that no policy for the target mentions, within `detection.window` |
//! | `untrusted_identity` | a target's sidecar refused a revoked, expired, not yet valid or untrusted certificate from a source |
//! | `plaintext` | a target's sidecar refused plaintext on an mTLS-only port from a source |
//!
//! A signal fires once per peer and target within a window; the flows come in the sidecars'
//! reports (every 5 s), so an alert follows the behaviour within seconds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use sidewall_policies::wire::operator::{FlowKey, FlowStats};
use sidewall_policies::wire::{RefusalReason, RefusalRecord};
use sidewall_policies::{Engine, Protocol, SpiffeId};

use crate::now_unix;

/// Alerts kept for the dashboard, newest last.
pub const KEPT: usize = 200;

/// Keys (pairs, sources, edges) each signal tracks at most: reports come from sidecars, one of
/// which may be compromised and name any number of peers or sources. When a table is full,
/// windows that are over make room; a new key that still finds no room is not tracked, and
/// is counted in `sidewall_control_plane_flows_dropped_total{reason="detection_full"}`.
pub const MAX_TRACKED: usize = 10_000;

/// Counts what detection could not track.
fn untracked() {
    metrics::counter!(crate::metric::FLOWS_DROPPED, "reason" => "detection_full").increment(1);
}

/// The window of `key` in `table`, rolled over when it is over; a new one if there is room
/// (see [`MAX_TRACKED`]).
fn window_of<K: std::hash::Hash + Eq, V: Default>(
    table: &mut HashMap<K, Windowed<V>>,
    key: K,
    window: Duration,
) -> Option<&mut Windowed<V>> {
    if table.len() >= MAX_TRACKED && !table.contains_key(&key) {
        table.retain(|_, w| w.since.elapsed() < window);
        if table.len() >= MAX_TRACKED {
            untracked();
            return None;
        }
    }
    let tracked = table.entry(key).or_insert_with(Windowed::new);
    tracked.roll(window);
    Some(tracked)
}

/// Thresholds and windows (`detection:` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectionConfig {
    /// The window denials and scanned paths are counted in. Default 60 s.
    pub window: Duration,
    /// Denials of one peer at one target within a window above which `denial_burst` fires.
    /// Default 20.
    pub denials: u64,
    /// Distinct unmentioned paths denied to one peer at one target within a window from which
    /// `path_scan` fires. Default 10.
    pub scan_paths: usize,
    /// How long after start every edge seen is taken as normal; after it, a new one fires
    /// `new_edge`. Default 1 h.
    pub baseline: Duration,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            denials: 20,
            scan_paths: 10,
            baseline: Duration::from_secs(3600),
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Many denials of one peer at one target.
    DenialBurst,
    /// A peer reaching a target it never reached before.
    NewEdge,
    /// Denials on many paths no policy mentions.
    PathScan,
    /// A revoked, expired or untrusted certificate still trying.
    UntrustedIdentity,
    /// Plaintext on an mTLS-only port.
    Plaintext,
}

impl Signal {
    /// The metric label and the panel's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::DenialBurst => "denial_burst",
            Signal::NewEdge => "new_edge",
            Signal::PathScan => "path_scan",
            Signal::UntrustedIdentity => "untrusted_identity",
            Signal::Plaintext => "plaintext",
        }
    }

    /// The `event` field of its log line.
    pub fn event(self) -> &'static str {
        match self {
            Signal::DenialBurst => "sidewall.alert.denial_burst",
            Signal::NewEdge => "sidewall.alert.new_edge",
            Signal::PathScan => "sidewall.alert.path_scan",
            Signal::UntrustedIdentity => "sidewall.alert.untrusted_identity",
            Signal::Plaintext => "sidewall.alert.plaintext",
        }
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// When, Unix seconds.
    pub at: i64,
    /// What fired.
    pub signal: Signal,
    /// The peer identity.
    pub peer: String,
    /// The target identity.
    pub target: String,
    /// What was seen, in words.
    pub detail: String,
}

/// A count within a window that started at `since`.
struct Windowed<T> {
    since: Instant,
    value: T,
    fired: bool,
}

impl<T: Default> Windowed<T> {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            value: T::default(),
            fired: false,
        }
    }

    /// Starts a new window when this one is over.
    fn roll(&mut self, window: Duration) {
        if self.since.elapsed() >= window {
            *self = Self::new();
        }
    }
}

type Pair = (String, String);

#[derive(Default)]
struct State {
    denials: HashMap<Pair, Windowed<u64>>,
    scans: HashMap<Pair, Windowed<HashSet<String>>>,
    /// Refused sources, by signal: one alert a window each.
    refused: HashMap<(Signal, Pair), Windowed<u64>>,
    edges: HashSet<Pair>,
    alerts: VecDeque<Alert>,
}

/// The detector, fed by every flow report.
pub struct Detector {
    config: DetectionConfig,
    started: Instant,
    state: Mutex<State>,
}

impl Detector {
    /// A detector whose baseline starts now.
    pub fn new(config: DetectionConfig) -> Self {
        Self {
            config,
            started: Instant::now(),
            state: Mutex::default(),
        }
    }

    /// The recent alerts, oldest first.
    pub fn alerts(&self) -> Vec<Alert> {
        self.lock().alerts.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at one report's flows (counts since the sidecar's last report), with the
    /// policies in force to tell which paths they mention.
    pub fn observe(&self, flows: &[(FlowKey, FlowStats)], engine: &Engine) {
        let mut state = self.lock();
        let learning = self.started.elapsed() < self.config.baseline;
        for (key, stats) in flows {
            let pair = (key.peer.clone(), key.target.clone());
            let known = state.edges.contains(&pair);
            if !known && state.edges.len() >= MAX_TRACKED {
                untracked();
            } else if !known && state.edges.insert(pair.clone()) && !learning {
                let detail = format!("first seen on port {}", key.port);
                self.fire(&mut state, Signal::NewEdge, &pair, detail);
            }
            if stats.deny == 0 {
                continue;
            }
            self.count_denials(&mut state, &pair, stats.deny);
            if let (Protocol::Http, Some(path)) = (key.protocol, &key.path) {
                let mentioned = SpiffeId::parse(&key.target)
                    .is_ok_and(|target| engine.mentions_path(&target, path));
                if !mentioned {
                    self.count_scanned(&mut state, &pair, path);
                }
            }
        }
    }

    /// Looks at the connections `target`'s sidecar refused before authorizing an identity.
    pub fn observe_refusals(&self, target: &SpiffeId, refusals: &[RefusalRecord]) {
        let mut state = self.lock();
        for refusal in refusals {
            let signal = match refusal.reason {
                RefusalReason::NotTls => Signal::Plaintext,
                RefusalReason::Other => continue,
                _ => Signal::UntrustedIdentity,
            };
            let pair = (refusal.source.clone(), target.to_string());
            let Some(window) = window_of(
                &mut state.refused,
                (signal, pair.clone()),
                self.config.window,
            ) else {
                continue;
            };
            window.value = window.value.saturating_add(refusal.count);
            if !window.fired {
                window.fired = true;
                let detail = format!(
                    "{} connection(s) refused: {}",
                    refusal.count,
                    refusal.reason.as_str()
                );
                self.fire(&mut state, signal, &pair, detail);
            }
        }
    }

    fn count_denials(&self, state: &mut State, pair: &Pair, denials: u64) {
        let Some(window) = window_of(&mut state.denials, pair.clone(), self.config.window) else {
            return;
        };
        window.value = window.value.saturating_add(denials);
        if window.value > self.config.denials && !window.fired {
            window.fired = true;
            let detail = format!(
                "{} denials within {} s",
                window.value,
                self.config.window.as_secs()
            );
            self.fire(state, Signal::DenialBurst, pair, detail);
        }
    }

    fn count_scanned(&self, state: &mut State, pair: &Pair, path: &str) {
        let Some(window) = window_of(&mut state.scans, pair.clone(), self.config.window) else {
            return;
        };
        // No more than it takes to fire: a scanner's paths are not kept without end.
        if window.value.len() < self.config.scan_paths {
            window.value.insert(path.to_owned());
        }
        if window.value.len() >= self.config.scan_paths && !window.fired {
            window.fired = true;
            let mut sample: Vec<&str> = window.value.iter().map(String::as_str).collect();
            sample.sort_unstable();
            let more = sample.len() > 5;
            sample.truncate(5);
            let detail = format!(
                "{} paths no policy mentions denied within {} s: {}{}",
                window.value.len(),
                self.config.window.as_secs(),
                sample.join(", "),
                if more { ", …" } else { "" }
            );
            self.fire(state, Signal::PathScan, pair, detail);
        }
    }

    fn fire(&self, state: &mut State, signal: Signal, pair: &Pair, detail: String) {
        metrics::counter!(crate::metric::ALERTS, "signal" => signal.as_str()).increment(1);
        tracing::warn!(
            event = signal.event(),
            peer = pair.0,
            target = pair.1,
            detail,
            "alert: {}",
            signal.as_str()
        );
        if state.alerts.len() == KEPT {
            state.alerts.pop_front();
        }
        state.alerts.push_back(Alert {
            at: now_unix(),
            signal,
            peer: pair.0.clone(),
            target: pair.1.clone(),
            detail,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidewall_policies::load::{LoadOptions, load_str};

    const POLICY: &str = r#"
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api}
spec:
  target: spiffe://td/api
  rules:
    - action: allow
      from: [spiffe://td/web]
      http: {paths: ["/v1/**"]}
"#;

    fn engine() -> Engine {
        Engine::new(
            load_str("p.yaml", POLICY, &LoadOptions::default())
                .unwrap_or_else(|e| panic!("{e}"))
                .policies,
        )
    }

    fn denied(peer: &str, path: Option<&str>, deny: u64) -> (FlowKey, FlowStats) {
        (
            FlowKey {
                peer: format!("spiffe://td/{peer}"),
                target: "spiffe://td/api".into(),
                port: 8080,
                protocol: if path.is_some() {
                    Protocol::Http
                } else {
                    Protocol::Tcp
                },
                method: path.map(|_| "GET".to_owned()),
                path: path.map(str::to_owned),
            },
            FlowStats {
                count: deny,
                deny,
                ..FlowStats::default()
            },
        )
    }

    fn signals(detector: &Detector) -> Vec<(Signal, String)> {
        detector
            .alerts()
            .into_iter()
            .map(|a| {
                (
                    a.signal,
                    a.peer.trim_start_matches("spiffe://td/").to_owned(),
                )
            })
            .collect()
    }

    fn detector(baseline: Duration) -> Detector {
        Detector::new(DetectionConfig {
            window: Duration::from_secs(3600),
            denials: 5,
            scan_paths: 3,
            baseline,
        })
    }

    #[test]
    fn a_burst_of_denials_fires_once_per_window_above_the_threshold() {
        let detector = detector(Duration::from_secs(3600));
        let engine = engine();
        detector.observe(&[denied("web", None, 3)], &engine);
        detector.observe(&[denied("web", None, 2)], &engine);
        assert!(signals(&detector).is_empty(), "5 is not more than 5");
        detector.observe(&[denied("web", None, 1)], &engine);
        detector.observe(&[denied("web", None, 9)], &engine);
        // Another peer has its own count.
        detector.observe(&[denied("batch", None, 5)], &engine);
        assert_eq!(
            signals(&detector),
            [(Signal::DenialBurst, "web".to_owned())]
        );
        assert_eq!(detector.alerts()[0].detail, "6 denials within 3600 s");
    }

    #[test]
    fn denials_on_paths_no_policy_mentions_are_a_scan() {
        let detector = Detector::new(DetectionConfig {
            denials: 1000,
            ..detector(Duration::from_secs(3600)).config
        });
        let engine = engine();
        // Paths under /v1 are mentioned: not a scan, whatever their number.
        for path in ["/v1/a", "/v1/b", "/v1/c", "/v1/d"] {
            detector.observe(&[denied("web", Some(path), 1)], &engine);
        }
        assert!(signals(&detector).is_empty());
        detector.observe(&[denied("web", Some("/admin"), 1)], &engine);
        detector.observe(&[denied("web", Some("/.git"), 1)], &engine);
        // The same path again is not a new one.
        detector.observe(&[denied("web", Some("/admin"), 1)], &engine);
        assert!(signals(&detector).is_empty());
        detector.observe(&[denied("web", Some("/wp-login.php"), 1)], &engine);
        assert_eq!(signals(&detector), [(Signal::PathScan, "web".to_owned())]);
        assert!(
            detector.alerts()[0]
                .detail
                .starts_with("3 paths no policy mentions"),
            "{:?}",
            detector.alerts()
        );
    }

    #[test]
    fn refused_certificates_and_plaintext_fire_once_per_source() {
        let detector = detector(Duration::from_secs(3600));
        let target = SpiffeId::parse("spiffe://td/api").unwrap_or_else(|e| panic!("{e}"));
        let refusal = |reason, source: &str| RefusalRecord {
            reason,
            source: source.into(),
            count: 2,
        };
        detector.observe_refusals(
            &target,
            &[
                refusal(RefusalReason::Revoked, "spiffe://td/batch"),
                refusal(RefusalReason::UnknownIssuer, "10.0.0.9"),
                refusal(RefusalReason::NotTls, "10.0.0.9"),
                refusal(RefusalReason::Other, "10.0.0.8"),
            ],
        );
        // Again within the window: nothing new.
        detector.observe_refusals(
            &target,
            &[
                refusal(RefusalReason::CertificateExpired, "spiffe://td/batch"),
                refusal(RefusalReason::NotTls, "10.0.0.9"),
            ],
        );
        let fired: Vec<(Signal, String, String)> = detector
            .alerts()
            .into_iter()
            .map(|a| (a.signal, a.peer, a.detail))
            .collect();
        assert_eq!(
            fired,
            [
                (
                    Signal::UntrustedIdentity,
                    "spiffe://td/batch".to_owned(),
                    "2 connection(s) refused: revoked".to_owned()
                ),
                (
                    Signal::UntrustedIdentity,
                    "10.0.0.9".to_owned(),
                    "2 connection(s) refused: unknown_issuer".to_owned()
                ),
                (
                    Signal::Plaintext,
                    "10.0.0.9".to_owned(),
                    "2 connection(s) refused: not_tls".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn a_flood_of_sources_is_tracked_up_to_the_cap() {
        let detector = detector(Duration::from_secs(3600));
        let target = SpiffeId::parse("spiffe://td/api").unwrap_or_else(|e| panic!("{e}"));
        let flood: Vec<RefusalRecord> = (0..MAX_TRACKED + 500)
            .map(|i| RefusalRecord {
                reason: RefusalReason::NotTls,
                source: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                count: 1,
            })
            .collect();
        detector.observe_refusals(&target, &flood);
        assert_eq!(detector.lock().refused.len(), MAX_TRACKED);
        // A source already tracked is still counted (no second alert within its window).
        detector.observe_refusals(&target, &flood[..1]);
        assert_eq!(detector.lock().refused.len(), MAX_TRACKED);
        // Edges, from a sidecar naming any number of peers.
        let engine = engine();
        let peers: Vec<_> = (0..MAX_TRACKED + 500)
            .map(|i| denied(&format!("p{i}"), None, 1))
            .collect();
        detector.observe(&peers, &engine);
        let state = detector.lock();
        assert_eq!(state.edges.len(), MAX_TRACKED);
        assert_eq!(state.denials.len(), MAX_TRACKED);
    }

    #[test]
    fn an_edge_first_seen_after_the_baseline_fires_once() {
        let engine = engine();
        let learning = detector(Duration::from_secs(3600));
        learning.observe(&[denied("web", None, 1)], &engine);
        assert!(signals(&learning).is_empty(), "still learning");
        let watching = detector(Duration::ZERO);
        watching.observe(&[denied("web", None, 1)], &engine);
        watching.observe(&[denied("web", None, 1)], &engine);
        assert_eq!(signals(&watching), [(Signal::NewEdge, "web".to_owned())]);
    }
}
