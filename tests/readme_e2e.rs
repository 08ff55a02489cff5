//! The README's shell blocks, run as they stand (issue #16: "every README
//! block, pasted as it stands on a fresh clone, works"), so the README
//! cannot drift from the program.
//!
//! A block is tested when the line before its ```` ```sh ```` fence is
//! `<!-- readme-test: NAME … -->`. Each runs with bash in a temporary copy
//! of what a clone has at hand (the shipped `config.toml`, the binary at
//! `./target/release/anp-proxy`), with the README's fixed ports (8000,
//! 8089, 8090, 8189) replaced by free ones and `/tmp/app` by a temporary
//! directory, in a process group of its own that is killed at the end.
//! The test asserts what the block promises in its comments: a 200 with
//! the app's text. Needs bash, curl and python3 (as the README does).

use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

/// A block that runs longer is stuck (its own waits are bounded at 30 s).
const BLOCK_WAIT: Duration = Duration::from_secs(90);

/// The README's marked blocks: (name, text).
fn marked_blocks(readme: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.trim().strip_prefix("<!-- readme-test:") else {
            continue;
        };
        let name = rest.split_whitespace().next().unwrap_or("").to_owned();
        assert_eq!(
            lines.get(i + 1).map(|l| l.trim()),
            Some("```sh"),
            "README line {}: a readme-test marker must sit right above a ```sh fence",
            i + 1
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        out.push((name, body.join("\n") + "\n"));
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `block` with bash in `dir`; its stdout and stderr together.
fn run_block(name: &str, dir: &Path, block: &str) -> String {
    std::fs::write(dir.join("block.sh"), block).unwrap();
    let out_path = dir.join("block.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new("bash")
        .arg("block.sh")
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("run bash");
    let pgid = child.id() as i32;
    // A watchdog ends a stuck block: the whole group, after BLOCK_WAIT.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let stuck = finished.recv_timeout(BLOCK_WAIT).is_err();
        if stuck {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        stuck
    });
    let status = child.wait().unwrap();
    let _ = done.send(());
    let stuck = watchdog.join().unwrap();
    // Whatever the block left running (a failed block skips its `kill`).
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let status = (!stuck).then_some(status);
    let mut text = String::new();
    std::fs::File::open(&out_path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    match status {
        Some(s) if s.success() => text,
        Some(s) => panic!("README block `{name}` failed ({s}):\n{block}\n--- output:\n{text}"),
        None => panic!("README block `{name}` still running after {BLOCK_WAIT:?}:\n{block}\n--- output:\n{text}"),
    }
}

/// A temporary clone-like directory: config.toml (ports replaced) and
/// ./target/release/anp-proxy (the binary under test).
fn workspace(ports: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("anp-e2e-readme-")
        .tempdir()
        .unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("config.toml")).unwrap();
    std::fs::write(dir.path().join("config.toml"), substitute(&config, ports)).unwrap();
    std::fs::create_dir_all(dir.path().join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        common::procs::binary(),
        dir.path().join("target/release/anp-proxy"),
    )
    .unwrap();
    dir
}

fn substitute(text: &str, pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
}

#[test]
fn the_readme_shell_blocks_work_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["quick-start", "did"], "the README's tested blocks");
    // What each block promises (in its comments): a 200 with the app's text.
    let promised = |name: &str| match name {
        "quick-start" => "hello",
        "did" => "hello from alice",
        other => panic!("no promise known for README block `{other}`"),
    };
    for (name, block) in &blocks {
        let app_dir = tempfile::tempdir().unwrap();
        let ports = [
            ("8000", free_port().to_string()),
            ("8089", free_port().to_string()),
            ("8090", free_port().to_string()),
            ("8189", free_port().to_string()),
            ("/tmp/app", app_dir.path().join("app").display().to_string()),
        ];
        let dir = workspace(&ports);
        let out = run_block(name, dir.path(), &substitute(block, &ports));
        let want = promised(name);
        let response = out
            .split("HTTP/1.1 ")
            .nth(1)
            .unwrap_or_else(|| panic!("`{name}`: no HTTP response in its output:\n{out}"));
        assert!(
            response.starts_with("200") && response.contains(want),
            "`{name}`: expected 200 with {want:?}; output:\n{out}"
        );
    }
}
