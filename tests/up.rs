//! `sidewall up --check` runs the three-tier example until every expectation in its mesh
//! description has been observed: allowed flows succeed, denied ones are refused and never
//! reach the app, the audited one is allowed and recorded.

mod support;

use support::sidewall;

#[test]
fn the_three_tier_example_meets_its_expectations() {
    let run = sidewall([
        "up",
        "--check",
        "--timeout-seconds",
        "120",
        "examples/three-tier",
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("all 5 expectations observed"),
        "{}",
        run.stdout
    );
    let row = |flow: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(flow))
            .unwrap_or_else(|| panic!("no row for {flow}:\n{}", run.stdout))
            .to_owned()
    };
    // The denied flow carries its reason.
    assert!(
        row("frontend -> db:5432").contains("no policy lets it call this service"),
        "{}",
        run.stdout
    );
    // Requests denied per request name the default deny.
    assert!(
        row("frontend -> api:8080").contains("DELETE /v1/orders: default deny"),
        "{}",
        run.stdout
    );
    // It cleans up after itself: the work directory it names is gone.
    assert!(!run.stdout.contains("panicked"));
}
