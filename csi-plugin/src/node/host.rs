//! What this node's kernel offers for attaching volumes, found once at
//! startup (loading the nbd driver if it is missing) and reported in the
//! log and as a metric, so an operator sees at once whether volumes get
//! kernel NBD or the FUSE + loop fallback; and what this process may do
//! to a mounted filesystem.

use std::sync::LazyLock;

use prometheus::{register_int_gauge_vec, IntGaugeVec};

use crate::node::attach::{AttachProbe, NbdClient};

static ATTACH_METHOD: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ballast_csi_node_attach_method",
        "1 for the way volumes attach on this node: netlink, ioctl, fuse-loop or none",
        &["method"]
    )
    .unwrap()
});

static KERNEL_FEATURE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ballast_csi_node_kernel_feature",
        "1 when a kernel feature works for the node plugin, 0 when not: nbd, fuse, io_uring",
        &["feature"]
    )
    .unwrap()
});

/// Probes the host through `nbd-client probe` (which loads the nbd module
/// if it is missing) and reports the answer.
pub async fn report_attach_method(nbd: &NbdClient) {
    match nbd.probe().await {
        Ok(probe) => {
            log(&probe);
            ATTACH_METHOD.with_label_values(&[probe.method.as_deref().unwrap_or("none")]).set(1);
            for (feature, missing) in &probe.missing {
                KERNEL_FEATURE.with_label_values(&[feature]).set(i64::from(missing.is_none()));
                match missing {
                    None => tracing::info!(feature, "kernel feature works"),
                    Some(reason) => tracing::warn!(feature, reason, "kernel feature unavailable on this node"),
                }
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot tell how volumes attach on this node"),
    }
}

fn log(probe: &AttachProbe) {
    let module = probe.module.as_deref().unwrap_or("not needed");
    match probe.method.as_deref() {
        Some("netlink") => tracing::info!(method = "netlink", module, "volumes attach through kernel NBD"),
        Some(method) => tracing::warn!(
            method,
            module,
            reason = %probe.reason,
            "kernel NBD (netlink) is not available on this node: volumes attach through {method}; \
             load the nbd module: a kernel NBD device survives the death of its serving process, \
             this one does not"
        ),
        None => tracing::error!(module, reason = %probe.reason, "volumes cannot be attached on this node"),
    }
}

/// The capability ext4's online resize (EXT4_IOC_RESIZE_FS, behind
/// resize2fs on a mounted filesystem) demands. A privileged container has
/// it; some container runtimes drop it even there.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process may grow a mounted ext4 filesystem.
pub fn can_grow_mounted_ext4() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    effective_capabilities(&status).is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

fn effective_capabilities(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_come_from_proc_status() {
        let status = "Name:\tcsi-plugin\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n";
        let caps = effective_capabilities(status).unwrap();
        assert_eq!(caps & (1 << CAP_SYS_RESOURCE), 0, "bit 24 is clear in ...feffffff");
        assert_ne!(caps & (1 << 21), 0);
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }
}
