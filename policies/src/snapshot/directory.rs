//! The directory a workload's snapshot carries, assembled from the sidecars' registrations:
//! every service the workload may call, where that service's sidecars listen, the ports they
//! serve and the extra addresses its callers may dial.
//!
//! An extra address is listed only when an operator declared it for that identity in a
//! policy, and never when it is another service's endpoint (or one of its ports on that
//! host): a workload cannot draw its callers' traffic by registering someone else's address.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::ServiceEntry;
use crate::engine::Engine;
use crate::identity::SpiffeId;
use crate::wire::operator::{RefusedBecause, RegistrationRecord};

/// The registrations, indexed by endpoint host once per assembly so that checking an address
/// costs one lookup, not a pass over every registration.
pub struct Registrations<'a> {
    records: &'a [RegistrationRecord],
    hosts: HashMap<IpAddr, Vec<(&'a RegistrationRecord, u16)>>,
}

impl<'a> Registrations<'a> {
    /// Indexes `records`.
    pub fn new(records: &'a [RegistrationRecord]) -> Self {
        let mut hosts: HashMap<IpAddr, Vec<_>> = HashMap::new();
        for record in records {
            if let Ok(endpoint) = record.endpoint.parse::<SocketAddr>() {
                hosts
                    .entry(endpoint.ip().to_canonical())
                    .or_default()
                    .push((record, endpoint.port()));
            }
        }
        Self { records, hosts }
    }

    /// Whether a registration of another identity than `identity` serves `address` (its
    /// endpoint, or one of its ports on its endpoint's host).
    fn another_serves(&self, identity: &SpiffeId, address: SocketAddr) -> bool {
        self.hosts
            .get(&address.ip().to_canonical())
            .into_iter()
            .flatten()
            .any(|(record, port)| {
                record.identity != identity.as_str()
                    && (*port == address.port()
                        || record.ports.iter().any(|p| p.port == address.port()))
            })
    }

    /// Why callers of `identity` may not be sent to `address`, or `None` when they may.
    pub fn address_refusal(
        &self,
        engine: &Engine,
        identity: &SpiffeId,
        address: &str,
    ) -> Option<RefusedBecause> {
        let Ok(address) = address.parse::<SocketAddr>() else {
            return Some(RefusedBecause::NotDeclared);
        };
        if !engine.policy_set().declares(identity, address) {
            return Some(RefusedBecause::NotDeclared);
        }
        self.another_serves(identity, address)
            .then_some(RefusedBecause::EndpointOfAnother)
    }

    /// The directory for `workload`: one entry per service it may call
    /// ([`Engine::may_call`]), in identity order, each endpoint, port and address once.
    pub fn directory_for(&self, engine: &Engine, workload: &SpiffeId) -> Vec<ServiceEntry> {
        let mut by_service: BTreeMap<&str, ServiceEntry> = BTreeMap::new();
        // What each entry holds already: a pass over its list per registration would be
        // quadratic in a service's registrations.
        let mut seen_ports: HashSet<(&str, u16)> = HashSet::new();
        let mut seen_addresses: HashSet<(&str, &str)> = HashSet::new();
        for registration in self.records {
            let Ok(service) = SpiffeId::parse(&registration.identity) else {
                continue;
            };
            if !engine.may_call(workload, &service) {
                continue;
            }
            let name = registration.identity.as_str();
            let entry = by_service.entry(name).or_insert_with(|| ServiceEntry {
                identity: service.clone(),
                endpoints: Vec::new(),
                ports: Vec::new(),
                addresses: Vec::new(),
            });
            entry.endpoints.push(registration.endpoint.clone());
            for port in &registration.ports {
                if seen_ports.insert((name, port.port)) {
                    entry.ports.push(*port);
                }
            }
            for address in &registration.addresses {
                if !seen_addresses.contains(&(name, address.as_str()))
                    && self.address_refusal(engine, &service, address).is_none()
                {
                    seen_addresses.insert((name, address.as_str()));
                    entry.addresses.push(address.clone());
                }
            }
        }
        by_service.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{LoadOptions, load_str};
    use crate::policy::Protocol;
    use crate::snapshot::ServicePort;

    const POLICIES: &str = r#"
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api}
spec:
  target: spiffe://td/api
  addresses: ["10.96.0.10:80"]
  rules:
    - action: allow
      from: [spiffe://td/web]
    - action: deny
      from: [spiffe://td/batch]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: reports}
spec:
  target: spiffe://td/reports
  mode: audit
  rules:
    - action: deny
      from: ["spiffe://td/*"]
---
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: db}
spec:
  target: spiffe://td/db
  rules:
    - action: deny
      from: [spiffe://td/web]
"#;

    fn engine() -> Engine {
        let loaded = load_str("policies.yaml", POLICIES, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        Engine::new(loaded.policies)
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td/{path}")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn registration(
        instance: &str,
        identity: &str,
        endpoint: &str,
        port: u16,
        addresses: &[&str],
    ) -> RegistrationRecord {
        RegistrationRecord {
            instance: instance.into(),
            identity: format!("spiffe://td/{identity}"),
            endpoint: endpoint.into(),
            ports: vec![ServicePort {
                port,
                protocol: Protocol::Http,
                path_parameters: Default::default(),
            }],
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            registered_at: 0,
        }
    }

    #[test]
    fn who_may_call_whom() {
        let engine = engine();
        let table = [
            // An allow rule names the caller.
            ("web", "api", true),
            // Only a deny rule names it.
            ("batch", "api", false),
            // No rule names it.
            ("other", "api", false),
            // Audit only: not enforced yet, so anyone.
            ("batch", "reports", true),
            // Only deny rules, enforced.
            ("web", "db", false),
            // No policy at all: default deny.
            ("web", "nowhere", false),
        ];
        for (workload, service, expected) in table {
            assert_eq!(
                engine.may_call(&id(workload), &id(service)),
                expected,
                "{workload} → {service}"
            );
        }
    }

    #[test]
    fn an_address_is_listed_only_when_declared_and_nobody_elses() {
        let engine = engine();
        let records = [
            registration("api-1", "api", "10.0.0.7:4643", 8080, &[]),
            registration("db-1", "db", "10.0.0.9:4643", 5432, &[]),
        ];
        let registrations = Registrations::new(&records);
        let table = [
            ("10.96.0.10:80", None),
            ("10.96.0.11:80", Some(RefusedBecause::NotDeclared)),
            ("api.shop:80", Some(RefusedBecause::NotDeclared)),
            // The db sidecar's endpoint, and its service port on its host.
            ("10.0.0.9:4643", Some(RefusedBecause::NotDeclared)),
        ];
        for (address, expected) in table {
            assert_eq!(
                registrations.address_refusal(&engine, &id("api"), address),
                expected,
                "{address}"
            );
        }
        // Declared for api, but db serves it.
        let declared_on_db = r#"
apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api}
spec:
  target: spiffe://td/api
  addresses: ["10.0.0.9:4643", "10.0.0.9:5432", "10.0.0.7:9000"]
  rules: []
"#;
        let loaded = load_str("p.yaml", declared_on_db, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::new(loaded.policies);
        for (address, expected) in [
            ("10.0.0.9:4643", Some(RefusedBecause::EndpointOfAnother)),
            ("10.0.0.9:5432", Some(RefusedBecause::EndpointOfAnother)),
            ("[::ffff:10.0.0.9]:5432", Some(RefusedBecause::NotDeclared)),
            // Its own sidecar's host: not another's.
            ("10.0.0.7:9000", None),
        ] {
            assert_eq!(
                registrations.address_refusal(&engine, &id("api"), address),
                expected,
                "{address}"
            );
        }
    }

    #[test]
    fn the_directory_lists_each_callable_service_once() {
        let engine = engine();
        let records = [
            registration("api-1", "api", "10.0.0.7:4643", 8080, &["10.96.0.10:80"]),
            registration(
                "api-2",
                "api",
                "10.0.0.8:4643",
                8080,
                &["10.96.0.10:80", "10.96.0.99:80"],
            ),
            registration("db-1", "db", "10.0.0.9:4643", 5432, &[]),
            registration("rep-1", "reports", "10.0.0.5:4643", 9000, &[]),
            registration("bad", "not a spiffe id", "10.0.0.6:4643", 1, &[]),
        ];
        let registrations = Registrations::new(&records);
        let directory = registrations.directory_for(&engine, &id("web"));
        let names: Vec<&str> = directory.iter().map(|e| e.identity.as_str()).collect();
        assert_eq!(names, ["spiffe://td/api", "spiffe://td/reports"]);
        let api = &directory[0];
        assert_eq!(api.endpoints, ["10.0.0.7:4643", "10.0.0.8:4643"]);
        assert_eq!(api.ports.len(), 1);
        assert_eq!(api.addresses, ["10.96.0.10:80"]);
        assert!(
            registrations
                .directory_for(&engine, &id("nobody"))
                .iter()
                .all(|e| e.identity == id("reports"))
        );
    }
}
