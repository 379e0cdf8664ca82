//! The bodies the control plane reads (`policies/src/wire.rs`: certificate request,
//! registration, ack, flow report; `wire/operator.rs`: policy set, token, revocation and operator
//! requests), on arbitrary bytes, read as the control plane reads them.
//!
//! Never panics; a body that parses writes back to JSON that parses to the same value, and a
//! flow record the control plane keeps (`sanitized`) is within its limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sidewall_policies::wire::operator::{
    OperatorRequest, PolicySet, RevocationRequest, TokenRequest,
};
use sidewall_policies::wire::{
    self, Ack, CertificateRequest, FlowReport, MAX_FLOW_DENIAL, MAX_FLOW_METHOD, MAX_FLOW_PATH,
    Registration,
};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(input: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(input).ok()?;
    let text = serde_json::to_vec(&value).expect("a parsed body serializes");
    let again: T = serde_json::from_slice(&text).expect("a written body reads back");
    assert_eq!(again, value);
    Some(value)
}

fuzz_target!(|input: &[u8]| {
    round_trip::<CertificateRequest>(input);
    round_trip::<PolicySet>(input);
    round_trip::<TokenRequest>(input);
    round_trip::<RevocationRequest>(input);
    round_trip::<OperatorRequest>(input);
    if let Some(registration) = round_trip::<Registration>(input) {
        let _ = wire::valid_instance(&registration.instance);
    }
    if let Some(ack) = round_trip::<Ack>(input) {
        let _ = wire::valid_instance(&ack.instance);
    }
    if let Some(report) = round_trip::<FlowReport>(input) {
        for record in report.flows.into_iter().filter_map(wire::FlowRecord::sanitized) {
            assert!(record.method.is_none_or(|m| m.len() <= MAX_FLOW_METHOD));
            assert!(record.path.is_none_or(|p| p.len() <= MAX_FLOW_PATH));
            assert!(record.last_denial.is_none_or(|d| d.chars().count() <= MAX_FLOW_DENIAL));
        }
    }
});
