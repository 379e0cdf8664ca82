//! The crypto floor: how fast one core seals and opens TLS records with the AEAD the sidecars
//! negotiate (TLS 1.3 AES-256-GCM, aws-lc-rs, the workspace's one provider), measured in the
//! same run as the contenders. With the `splice-baseline` chain (bytes moved by the kernel
//! only) it gives each workload's limit: what no mTLS proxy chain can beat on this machine
//! (see [`Limit`] for the formulas).

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::model::{Metric, Workload};

/// A TLS record's largest payload: what bulk transfers are sealed in.
pub const RECORD: usize = 16 * 1024;

/// Seal and open speed of one core, in Gbit/s of plaintext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CryptoFloor {
    /// The AEAD and its provider.
    pub aead: String,
    /// The plaintext per record, bytes.
    pub record_bytes: usize,
    /// Sealing (encrypting and tagging), one core.
    pub seal_gbps: f64,
    /// Opening (checking and decrypting), one core.
    pub open_gbps: f64,
}

impl CryptoFloor {
    /// Seals, then opens, 16 KiB records for about `duration` each, on this thread.
    pub fn measure(duration: Duration) -> Result<Self, String> {
        let key = || {
            UnboundKey::new(&AES_256_GCM, &[7u8; 32])
                .map(LessSafeKey::new)
                .map_err(|_| "AES-256-GCM key refused".to_owned())
        };
        let (sealer, opener) = (key()?, key()?);
        let nonce = |n: u64| {
            let mut bytes = [0u8; 12];
            bytes[4..].copy_from_slice(&n.to_be_bytes());
            Nonce::assume_unique_for_key(bytes)
        };
        let header = [23u8, 3, 3, 0x40, 0x11];
        let mut record = vec![0x5au8; RECORD];
        let mut sealed = Vec::new();
        let mut count = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration || count == 0 {
            record.truncate(RECORD);
            sealer
                .seal_in_place_append_tag(nonce(count), Aad::from(header), &mut record)
                .map_err(|_| "seal failed".to_owned())?;
            if count == 0 {
                sealed.clone_from(&record);
            }
            count += 1;
        }
        let seal_gbps = gbps(count, started.elapsed());
        let mut count = 0u64;
        let mut opened = sealed.clone();
        let started = Instant::now();
        while started.elapsed() < duration || count == 0 {
            opened.clone_from(&sealed);
            opener
                .open_in_place(nonce(0), Aad::from(header), &mut opened)
                .map_err(|_| "open failed: the record does not verify".to_owned())?;
            count += 1;
        }
        Ok(Self {
            aead: "TLS 1.3 AES-256-GCM (aws-lc-rs)".to_owned(),
            record_bytes: RECORD,
            seal_gbps,
            open_gbps: gbps(count, started.elapsed()),
        })
    }
}

fn gbps(records: u64, elapsed: Duration) -> f64 {
    (records as f64 * RECORD as f64 * 8.0) / elapsed.as_secs_f64().max(1e-9) / 1e9
}

/// The limit of an mTLS chain on this machine, from the `splice-baseline` chain measured in the
/// same run and the crypto floor, on `cores` cores:
///
/// - bulk rate (`gbps`): the CPU a byte costs in the splice chain (`cores / splice`) plus one
///   seal and one open, spread over the cores: `1 / (1/splice + (1/seal + 1/open) / cores)`;
/// - CPU per GB (`cpu_s_per_gb`): the splice chain's plus one seal and one open of a gigabyte:
///   `splice + 8/seal + 8/open` (seconds, rates in Gbit/s);
/// - request rates and latencies: the splice chain's own figure (the handshake and framing an
///   mTLS hop adds are not modelled, so this bound is loose);
/// - memory: none (a relay that holds no state is no bound for one that must).
#[derive(Debug, Clone, Copy)]
pub struct Limit<'a> {
    /// The crypto floor.
    pub floor: &'a CryptoFloor,
    /// The machine's cores.
    pub cores: f64,
}

impl Limit<'_> {
    /// The limit for `metric` of `workload`, given the splice chain's figure for it.
    pub fn of(&self, workload: Workload, metric: Metric, splice: f64) -> Option<f64> {
        let (seal, open) = (self.floor.seal_gbps, self.floor.open_gbps);
        if seal <= 0.0 || open <= 0.0 || splice <= 0.0 || self.cores <= 0.0 {
            return None;
        }
        match metric {
            Metric::Gbps => Some(1.0 / (1.0 / splice + (1.0 / seal + 1.0 / open) / self.cores)),
            Metric::CpuSPerGb => Some(splice + 8.0 / seal + 8.0 / open),
            Metric::Rps | Metric::P50Us | Metric::P99Us | Metric::P999Us => {
                (workload != Workload::Idle10k).then_some(splice)
            }
            Metric::RssMib | Metric::RssKibPerConn => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_seals_and_opens_real_records() {
        let floor = CryptoFloor::measure(Duration::from_millis(20)).unwrap();
        assert!(floor.seal_gbps > 0.0 && floor.open_gbps > 0.0, "{floor:?}");
    }

    #[test]
    fn limits_follow_the_formulas() {
        let floor = CryptoFloor {
            aead: String::new(),
            record_bytes: RECORD,
            seal_gbps: 16.0,
            open_gbps: 16.0,
        };
        let limit = Limit {
            floor: &floor,
            cores: 2.0,
        };
        // 1 / (1/16 + (1/16 + 1/16) / 2) = 8.
        assert_eq!(
            limit.of(Workload::Throughput1, Metric::Gbps, 16.0),
            Some(8.0)
        );
        assert_eq!(
            limit.of(Workload::Throughput1, Metric::CpuSPerGb, 0.5),
            Some(1.5)
        );
        assert_eq!(limit.of(Workload::RrC1, Metric::Rps, 9000.0), Some(9000.0));
        assert_eq!(limit.of(Workload::Idle10k, Metric::RssMib, 3.0), None);
        assert_eq!(limit.of(Workload::Throughput1, Metric::Gbps, 0.0), None);
    }
}
