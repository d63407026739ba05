//! Fault injection for tests: make one named place panic, to prove that a panic while
//! serving one queue or connection stays there.
//!
//! `NVMUX_TEST_FAULTS=place[,place...]` in the daemon's environment, read once. A place
//! is `kind:name`, for example `nbd-request:vm1` (the first request on any NBD connection
//! to export `vm1` panics). Unset (always, outside tests), [`armed`] is one load of an
//! initialised `OnceLock` and returns false; it is asked when a queue or connection is
//! set up, never per request.

use std::sync::OnceLock;

fn places() -> &'static [String] {
    static P: OnceLock<Vec<String>> = OnceLock::new();
    P.get_or_init(|| {
        std::env::var("NVMUX_TEST_FAULTS")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Is the fault `kind:name` armed?
pub fn armed(kind: &str, name: &str) -> bool {
    places().iter().any(|p| {
        p.split_once(':')
            .is_some_and(|(k, n)| k == kind && n == name)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn unset_means_nothing_is_armed() {
        // The test environment does not set NVMUX_TEST_FAULTS.
        assert!(!super::armed("nbd-request", "x"));
    }
}
