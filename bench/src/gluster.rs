//! A GlusterFS dispersed volume on this machine, as a peer of DRS in
//! `bench timeline --fs --gluster`: its own glusterd (bound to 127.0.0.1, working
//! directory under the run's directory), k+m bricks with redundancy m, mounted through
//! its FUSE client. Bricks are killed, stopped, restarted and replaced like DRS nodes.
//! Everything started is stopped by process id when the value is dropped.
//!
//! Debian: `apt-get install glusterfs-server glusterfs-client`. The CLI refuses
//! `127.0.0.1` and `localhost` as brick hosts, so bricks are named by this machine's
//! host name, which must resolve to a loopback address (as on Debian).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const VOLUME: &str = "drsbench";

pub fn available() -> bool {
    ["glusterd", "gluster", "glusterfs"]
        .iter()
        .all(|p| crate::report::runs(p))
}

pub struct Gluster {
    dir: PathBuf,
    host: String,
    pub mount: PathBuf,
    bricks: Vec<PathBuf>,
    glusterd: Option<u32>,
    client: Option<u32>,
    /// Every process id seen (bricks, self-heal daemon), stopped at the end.
    seen: Vec<u32>,
    /// Each brick's process as last seen, by brick path: a planned signal goes out
    /// at once, without asking glusterd first.
    pids: std::collections::HashMap<String, u32>,
    /// Bricks added by replacements.
    replaced: usize,
}

fn gluster(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("timeout")
        .arg("120")
        .arg("gluster")
        .arg("--mode=script")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run gluster")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "gluster {}: {}{}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The text of the first `<name>...</name>` in `xml`.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let a = xml.find(&open)? + open.len();
    let b = xml[a..].find(&close)? + a;
    Some(xml[a..b].trim())
}

/// The bricks of `gluster volume status VOL --xml` output: (brick path, pid if it
/// is online), in brick order.
pub fn brick_pids(xml: &str) -> Vec<(String, Option<u32>)> {
    xml.split("<node>")
        .skip(1)
        .filter_map(|node| {
            let path = tag(node, "path")?;
            if !path.starts_with('/') {
                // The self-heal daemon and other services.
                return None;
            }
            let online = tag(node, "status") == Some("1");
            let pid = tag(node, "pid").and_then(|p| p.parse().ok());
            Some((path.to_string(), pid.filter(|_| online)))
        })
        .collect()
}

/// Entries still to heal, summed over the bricks of `gluster volume heal VOL info
/// --xml` output (None if a brick's count is not known, e.g. it is down).
pub fn heal_pending(xml: &str) -> Option<u64> {
    let mut total = 0;
    let mut bricks = 0;
    for b in xml.split("<brick ").skip(1) {
        total += tag(b, "numberOfEntries")?.parse::<u64>().ok()?;
        bricks += 1;
    }
    (bricks > 0).then_some(total)
}

impl Gluster {
    /// Starts glusterd, creates and starts a `k+m` dispersed volume under `dir`,
    /// and mounts it.
    pub fn start(dir: &Path, k: u8, m: u8) -> anyhow::Result<Gluster> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("read the host name")?
            .trim()
            .to_string();
        let work = dir.join("glusterd");
        std::fs::create_dir_all(&work)?;
        let vol = dir.join("glusterd.vol");
        std::fs::write(
            &vol,
            format!(
                "volume management\n    type mgmt/glusterd\n    option working-directory {}\n    option transport-type socket\n    option transport.socket.bind-address 127.0.0.1\n    option transport.socket.listen-port 24007\n    option transport.socket.read-fail-log off\n    option ping-timeout 0\n    option event-threads 1\nend-volume\n",
                work.display()
            ),
        )?;
        let mut g = Gluster {
            dir: dir.to_path_buf(),
            host,
            mount: dir.join("mnt"),
            bricks: (0..(k + m) as usize)
                .map(|i| dir.join(format!("bricks/b{i}")))
                .collect(),
            glusterd: None,
            client: None,
            seen: Vec::new(),
            pids: Default::default(),
            replaced: 0,
        };
        let pidfile = dir.join("glusterd.pid");
        let st = Command::new("glusterd")
            .arg("-f")
            .arg(&vol)
            .arg("-p")
            .arg(&pidfile)
            .arg(format!("--log-file={}", dir.join("glusterd.log").display()))
            .status()
            .context("start glusterd")?;
        if !st.success() {
            bail!("glusterd exited with {st}");
        }
        let until = Instant::now() + Duration::from_secs(20);
        while g.glusterd.is_none() {
            g.glusterd = read_pid(&pidfile);
            if Instant::now() > until {
                bail!("glusterd wrote no pid file");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Wait until it answers.
        let until = Instant::now() + Duration::from_secs(30);
        while gluster(&["volume", "list"]).is_err() {
            if Instant::now() > until {
                bail!("glusterd does not answer");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = gluster(&["volume", "stop", VOLUME, "force"]);
        let _ = gluster(&["volume", "delete", VOLUME]);
        let bricks: Vec<String> = g
            .bricks
            .iter()
            .map(|b| {
                std::fs::create_dir_all(b)?;
                Ok(format!("{}:{}", g.host, b.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let (d, r) = ((k + m).to_string(), m.to_string());
        let mut args = vec!["volume", "create", VOLUME, "disperse", &d, "redundancy", &r];
        args.extend(bricks.iter().map(|s| s.as_str()));
        args.push("force");
        gluster(&args)?;
        gluster(&["volume", "start", VOLUME])?;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let st = g.status()?;
            if st.len() == g.bricks.len() && st.iter().all(|(_, p)| p.is_some()) {
                break;
            }
            if Instant::now() > until {
                bail!("the bricks are not all online after 60 s: {st:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        g.note_pids()?;
        std::fs::create_dir_all(&g.mount)?;
        let client_pid = dir.join("client.pid");
        let st = Command::new("glusterfs")
            .arg("--volfile-server=127.0.0.1")
            .arg(format!("--volfile-id={VOLUME}"))
            .arg(format!("--pid-file={}", client_pid.display()))
            .arg(format!("--log-file={}", dir.join("client.log").display()))
            .arg(&g.mount)
            .status()
            .context("mount the volume")?;
        if !st.success() {
            bail!("glusterfs (the mount) exited with {st}");
        }
        g.client = read_pid(&client_pid);
        let until = Instant::now() + Duration::from_secs(30);
        while !crate::fuse::mounted(&g.mount) {
            if Instant::now() > until {
                bail!("the GlusterFS volume is not mounted after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(g)
    }

    fn status(&self) -> anyhow::Result<Vec<(String, Option<u32>)>> {
        Ok(brick_pids(&gluster(&[
            "volume", "status", VOLUME, "--xml",
        ])?))
    }

    fn note_pids(&mut self) -> anyhow::Result<()> {
        for (brick, pid) in self.status()? {
            if let Some(p) = pid {
                if !self.seen.contains(&p) {
                    self.seen.push(p);
                }
                self.pids.insert(brick, p);
            }
        }
        Ok(())
    }

    /// The pid of brick `i` (in creation order), as last seen.
    fn brick_pid(&self, i: usize) -> anyhow::Result<u32> {
        let path = self.bricks.get(i).context("no such brick")?;
        let want = path.display().to_string();
        self.pids
            .get(&want)
            .copied()
            .with_context(|| format!("brick {i} ({want}) is not running"))
    }

    pub fn signal(&mut self, i: usize, sig: Signal) -> anyhow::Result<()> {
        let pid = self.brick_pid(i)?;
        kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("{sig} brick {i}"))
    }

    /// Restarts dead bricks (`volume start force`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        gluster(&["volume", "start", VOLUME, "force"])?;
        self.note_pids()
    }

    /// Replaces brick `i` by a new, empty one (`replace-brick ... commit force`).
    pub fn replace(&mut self, i: usize) -> anyhow::Result<()> {
        self.replaced += 1;
        let new = self.dir.join(format!("bricks/r{}", self.replaced));
        std::fs::create_dir_all(&new)?;
        let old = format!("{}:{}", self.host, self.bricks[i].display());
        let fresh = format!("{}:{}", self.host, new.display());
        gluster(&[
            "volume",
            "replace-brick",
            VOLUME,
            &old,
            &fresh,
            "commit",
            "force",
        ])?;
        self.bricks[i] = new;
        self.note_pids()
    }

    /// Waits until self-heal has nothing left (at most `limit`).
    pub fn wait_healed(limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            if let Ok(info) = gluster(&["volume", "heal", VOLUME, "info", "--xml"]) {
                if heal_pending(&info) == Some(0) {
                    return Ok(());
                }
            }
            if Instant::now() > until {
                bail!("self-heal not done within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Gluster {
    fn drop(&mut self) {
        let _ = self.note_pids();
        if crate::fuse::mounted(&self.mount) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = gluster(&["volume", "stop", VOLUME, "force"]);
        let _ = gluster(&["volume", "delete", VOLUME]);
        let mut pids: Vec<u32> = self.seen.clone();
        pids.extend(self.client);
        pids.extend(self.glusterd);
        for p in &pids {
            let pid = Pid::from_raw(*p as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_brick_pids_and_down_bricks() {
        let xml = "<cliOutput><volStatus><volumes><volume><volName>drsbench</volName>
<node><hostname>vm</hostname><path>/tmp/a-rather-long/path/of/the/run/bricks/b0</path>
<status>1</status><port>49227</port><pid>22446</pid></node>
<node><hostname>vm</hostname><path>/tmp/b/b1</path><status>0</status><port>N/A</port><pid>-1</pid></node>
<node><hostname>Self-heal Daemon</hostname><path>localhost</path><status>1</status><pid>22554</pid></node>
</volume></volumes></volStatus></cliOutput>";
        assert_eq!(
            brick_pids(xml),
            vec![
                (
                    "/tmp/a-rather-long/path/of/the/run/bricks/b0".to_string(),
                    Some(22446)
                ),
                ("/tmp/b/b1".to_string(), None)
            ]
        );
    }

    #[test]
    fn heal_info_is_summed() {
        let xml = r#"<healInfo><bricks>
<brick hostUuid="u"><name>vm:/b/0</name><status>Connected</status><numberOfEntries>0</numberOfEntries></brick>
<brick hostUuid="u"><name>vm:/b/1</name><status>Connected</status><numberOfEntries>2</numberOfEntries></brick>
</bricks></healInfo>"#;
        assert_eq!(heal_pending(xml), Some(2));
        let down = r#"<brick hostUuid="u"><name>vm:/b/1</name><status>Transport endpoint is not connected</status><numberOfEntries>-</numberOfEntries></brick>"#;
        assert_eq!(heal_pending(down), None);
        assert_eq!(heal_pending(""), None);
    }
}
