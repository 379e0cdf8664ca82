//! The policy loader on arbitrary UTF-8 (`PolicyTest` documents included).
//!
//! Loading never panics, and neither does printing its errors. A set that loads is written back
//! with `to_yaml` and must load to an equal set; it compiles to an engine, and running the
//! loaded `PolicyTest` cases against it must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sidewall_policies::Engine;
use sidewall_policies::load::{self, LoadOptions};
use sidewall_policies::testing;

fuzz_target!(|input: &str| {
    let options = LoadOptions {
        tests: true,
        ..LoadOptions::default()
    };
    match load::load_str("fuzz.yaml", input, &options) {
        Ok(loaded) => {
            let yaml = load::to_yaml(&loaded.policies);
            let again = load::load_str("again.yaml", &yaml, &options)
                .unwrap_or_else(|e| panic!("to_yaml output does not load: {e}\n{yaml}"));
            assert_eq!(
                again.policies, loaded.policies,
                "to_yaml round trip\n{yaml}"
            );
            let engine = Engine::new(loaded.policies);
            let report = testing::run(&engine, &loaded.tests);
            for failure in &report.failures {
                let _ = failure.to_string();
            }
        }
        Err(errors) => {
            assert!(
                !errors.0.is_empty(),
                "a failed load reports at least one error"
            );
            let _ = errors.to_string();
        }
    }
});
