//! `ballast pki init|issue`: the files a component loads, and the mistakes
//! an operator can make.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use ballast_tls::{Role, TlsDir};

const BALLAST: &str = env!("CARGO_BIN_EXE_ballast");

fn ballast(args: &[&str]) -> Output {
    Command::new(BALLAST).args(args).output().expect("running ballast")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn init_then_issue_gives_each_component_its_identity() {
    let root = tempfile::tempdir().unwrap();
    let ca = root.path().join("ca");
    let ca_arg = ca.to_str().unwrap();
    let init = ballast(&["pki", "init", "--dir", ca_arg, "--cluster", "prod"]);
    assert!(init.status.success(), "{}", stderr(&init));
    assert_eq!(std::fs::metadata(ca.join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);

    // A second init would orphan every certificate the first one issued.
    let again = ballast(&["pki", "init", "--dir", ca_arg]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("an authority exists here already"), "{}", stderr(&again));

    let out = root.path().join("storage-1");
    let issued = ballast(&[
        "pki",
        "issue",
        "--ca",
        ca_arg,
        "--role",
        "storage",
        "--name",
        "ss-1",
        "--host",
        "10.0.0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    assert!(String::from_utf8_lossy(&issued.stdout).contains("issued storage/ss-1"));
    let identity = TlsDir::open(&out).unwrap().identity().unwrap();
    assert_eq!((identity.role, identity.name.as_str()), (Role::Storage, "ss-1"));
    assert_eq!(std::fs::metadata(out.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);

    let bad_role = ballast(&["pki", "issue", "--ca", ca_arg, "--role", "root", "--name", "x", "--out", "/tmp/unused"]);
    assert!(!bad_role.status.success());
    assert!(stderr(&bad_role).contains("unknown role \"root\""), "{}", stderr(&bad_role));
    let bad_name =
        ballast(&["pki", "issue", "--ca", ca_arg, "--role", "node", "--name", "a/b", "--out", "/tmp/unused"]);
    assert!(!bad_name.status.success());
    assert!(stderr(&bad_name).contains("invalid name"), "{}", stderr(&bad_name));
}
