//! Small readings of this machine, and the control-plane command line, that the harness and
//! the other binaries share.

/// `VmRSS` of `/proc/<pid>/status`, KiB; `None` when the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A loopback port free now (the OS picks it; it may be taken again before it is used).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `sidewall control-plane` on free loopback ports with its data in `data`, not yet spawned
/// (the caller adds flags, environment and output); and its API port.
pub fn control_plane_command(
    sidewall: &std::path::Path,
    data: &std::path::Path,
) -> std::io::Result<(std::process::Command, u16)> {
    let (api, admin, ui) = (free_port()?, free_port()?, free_port()?);
    let mut command = std::process::Command::new(sidewall);
    command
        .args(["control-plane", "--data-dir"])
        .arg(data)
        .args([
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--ui-listen",
            &format!("127.0.0.1:{ui}"),
        ]);
    Ok((command, api))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn this_process_has_a_resident_size_and_a_port_is_found() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(free_port().unwrap() > 0);
    }
}
