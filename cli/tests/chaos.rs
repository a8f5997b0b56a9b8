//! The roles as separate hosts: each coordinator, expert node and the router in its own Docker
//! container (an image built `FROM scratch` from the test's binary) on a private network,
//! talking mutual TLS. Under a steady load of greedy completions, the network misbehaves: the
//! coordinators' leader is cut off, the router is cut off, an expert node answers slowly
//! (netem delay, or a token-bucket filter where the kernel has no netem), and a node that
//! answers wrongly joins. Every request must complete with the
//! healthy cluster's text: none lost, none wrong.
//!
//! Needs a Docker daemon (every machine this project builds on has one) and root for `nsenter`
//! and `tc` in the containers' network namespaces.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("this test needs the `docker` command");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A private network, its containers and the image, removed when dropped (also on failure,
/// after printing the containers' logs).
struct Lab {
    tag: String,
    network: String,
    /// `10.X.Y.` : containers get `.10` and up.
    prefix: String,
    containers: Vec<String>,
    certs: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let info = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
        assert!(info.as_ref().is_ok_and(|o| o.status.success()), "this test needs a running Docker daemon: {info:?}");
        let id = std::process::id();
        let tag = format!("switchyard-chaos:{id}");
        // The image: the binary (debug info stripped) and the libraries it links, nothing else.
        let context = tempfile::tempdir().unwrap();
        let bin = context.path().join("switchyard");
        let stripped = Command::new("strip").arg("-o").arg(&bin).arg(env!("CARGO_BIN_EXE_switchyard")).status();
        if !stripped.is_ok_and(|s| s.success()) {
            std::fs::copy(env!("CARGO_BIN_EXE_switchyard"), &bin).unwrap();
        }
        let ldd = Command::new("ldd").arg(env!("CARGO_BIN_EXE_switchyard")).output().unwrap();
        for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
            let to = context.path().join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(lib, &to).unwrap();
        }
        std::fs::write(context.path().join("Dockerfile"), "FROM scratch\nCOPY . /\nENTRYPOINT [\"/switchyard\"]\n")
            .unwrap();
        docker(&["build", "-q", "-t", &tag, context.path().to_str().unwrap()]);
        let prefix = format!("10.{}.{}.", 200 + id % 50, (id / 50) % 250);
        let network = format!("switchyard-chaos-{id}");
        docker(&["network", "create", "--subnet", &format!("{prefix}0/24"), &network]);
        let certs = tempfile::tempdir().unwrap();
        assert!(switchyard(&["tls", "ca", "--dir", certs.path().to_str().unwrap()]).status.success());
        Lab { tag, network, prefix, containers: Vec::new(), certs }
    }

    fn ip(&self, host: u8) -> String {
        format!("{}{host}", self.prefix)
    }

    /// Starts `args` in a container named `name` at `.host`, presenting a `role` certificate;
    /// `model` is mounted at `/model`.
    fn start(&mut self, name: &str, host: u8, role: &str, model: &Path, args: &[&str], env: &[(&str, &str)]) {
        let env_tls = certificate_env(self.certs.path(), role, name);
        let certs = self.certs.path().to_str().unwrap();
        let container = format!("{}-{name}", self.network);
        let mut cmd = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            container.clone(),
            "--network".into(),
            self.network.clone(),
            "--ip".into(),
            self.ip(host),
            "-v".into(),
            format!("{}:/model:ro", model.display()),
            "-v".into(),
            format!("{certs}:{certs}:ro"),
            "-e".into(),
            "RUST_LOG=info".into(),
        ];
        for (k, v) in env_tls.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(env.iter().copied()) {
            cmd.extend(["-e".into(), format!("{k}={v}")]);
        }
        cmd.push(self.tag.clone());
        cmd.extend(args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        docker(&args);
        self.containers.push(container);
    }

    /// Runs `command` in container `name`'s network namespace (the host's tools, as root);
    /// returns whether it succeeded, and its error output.
    fn try_in_netns(&self, name: &str, command: &[&str]) -> Result<(), String> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &format!("{}-{name}", self.network)]);
        let out = Command::new("nsenter").args(["-t", &pid, "-n"]).args(command).output().unwrap();
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).to_string()) }
    }

    fn in_netns(&self, name: &str, command: &[&str]) {
        if let Err(e) = self.try_in_netns(name, command) {
            panic!("{command:?} in {name}: {e}");
        }
    }

    /// Cuts `name` off the network (every packet in or out is dropped, so connections stall
    /// rather than reset) or heals it.
    fn partition(&self, name: &str, cut: bool) {
        let op = if cut { "-I" } else { "-D" };
        self.in_netns(name, &["iptables", op, "INPUT", "-i", "eth0", "-j", "DROP"]);
        self.in_netns(name, &["iptables", op, "OUTPUT", "-o", "eth0", "-j", "DROP"]);
    }

    /// Makes `name` answer slowly: netem's delay where the kernel has it, else a token-bucket
    /// filter that lets its packets out at 16 kbit/s.
    fn slow(&self, name: &str, slow: bool) {
        if !slow {
            return self.in_netns(name, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
        let netem = ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "150ms"];
        if let Err(e) = self.try_in_netns(name, &netem) {
            println!("no netem ({}): a 16 kbit/s token bucket instead", e.trim());
            let tbf = [
                "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "16kbit", "burst", "1600", "latency", "10s",
            ];
            self.in_netns(name, &tbf);
        }
    }

    fn admin_env(&self) -> Vec<(String, String)> {
        certificate_env(self.certs.path(), "admin", "chaos-admin")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &self.containers {
            if std::thread::panicking() {
                let logs = Command::new("docker").args(["logs", "--tail", "30", c]).output();
                if let Ok(l) = logs {
                    eprintln!("--- {c}\n{}{}", String::from_utf8_lossy(&l.stdout), String::from_utf8_lossy(&l.stderr));
                }
            }
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &self.tag]).output();
    }
}

/// One completion over HTTP/1.1; `None` when it failed (any status but 200, or no answer).
fn complete(http: &str, prompt: &[u32]) -> Option<String> {
    use std::io::{Read, Write};
    let body = json!({"model": "mixtral", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true})
        .to_string();
    let mut stream = std::net::TcpStream::connect_timeout(&http.parse().unwrap(), Duration::from_secs(30)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        eprintln!("request failed: {head} {body}");
        return None;
    }
    let v: Value = serde_json::from_str(body).ok()?;
    Some(v["choices"][0]["text"].as_str()?.to_string())
}

/// Clients sending completions in a loop until stopped; each answer is checked against the
/// healthy cluster's.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    wrong: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(http: &str, prompts: &[Vec<u32>], expected: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, wrong) = (Arc::default(), Arc::default(), Arc::default());
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok, failed, wrong): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) =
                    (stop.clone(), Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&wrong));
                let (http, prompts, expected) = (http.to_string(), prompts.to_vec(), expected.to_vec());
                std::thread::spawn(move || {
                    let mut i = c;
                    while !stop.load(Ordering::Relaxed) {
                        let k = i % prompts.len();
                        match complete(&http, &prompts[k]) {
                            Some(text) if text == expected[k] => ok.fetch_add(1, Ordering::Relaxed),
                            Some(text) => {
                                eprintln!("wrong answer for prompt {k}: {text:?} (expected {:?})", expected[k]);
                                wrong.fetch_add(1, Ordering::Relaxed)
                            }
                            None => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        i += 1;
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, wrong, threads }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` more requests have succeeded (the cluster is making progress).
    fn progresses(&self, more: u64, what: &str) {
        let target = self.ok() + more;
        assert!(wait_until(Duration::from_secs(90), || self.ok() >= target), "no progress {what}");
    }

    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), self.wrong.load(Ordering::Relaxed))
    }
}

fn coordinator_status(lab: &Lab, coordinators: &str) -> Option<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["cluster", "status", "--coordinators", coordinators, "--json"])
        .envs(lab.admin_env())
        .output()
        .unwrap();
    out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap()["coordinator"].clone())
}

#[test]
fn separate_hosts_survive_partitions_slow_and_wrong_nodes_under_load() {
    let model = PathBuf::from(fixture("mixtral"));
    let mut lab = Lab::new();
    let coordinators: Vec<String> = (1..=3).map(|i| format!("{}:7100", lab.ip(10 + i))).collect();
    let list = coordinators.join(",");
    let peers: Vec<String> = coordinators.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    let peers = peers.join(",");
    for i in 1..=3u8 {
        let id = i.to_string();
        let args = [
            "coordinator",
            "--id",
            &id,
            "--listen",
            "0.0.0.0:7100",
            "--peers",
            &peers,
            "--data-dir",
            "/data",
            "--min-nodes",
            "2",
            "--replicas",
            "2",
            "--balance-interval-ms",
            "500",
        ];
        lab.start(&format!("c{i}"), 10 + i, "coordinator", &model, &args, &[]);
    }
    let node = |lab: &mut Lab, name: &str, host: u8, env: &[(&str, &str)]| {
        let advertise = format!("{}:7001", lab.ip(host));
        let args = ["expert-node", "--model", "/model", "--listen", "0.0.0.0:7001", "--advertise", &advertise];
        let args = [&args[..], &["--coordinators", &list]].concat();
        lab.start(name, host, "expert-node", &model, &args, env);
    };
    node(&mut lab, "n1", 21, &[]);
    node(&mut lab, "n2", 22, &[]);
    let args = [
        "router",
        "--model",
        "/model",
        "--served-model-name",
        "mixtral",
        "--listen",
        "0.0.0.0:7000",
        "--http",
        "0.0.0.0:8000",
    ];
    lab.start("router", 30, "router", &model, &[&args[..], &["--coordinators", &list]].concat(), &[]);
    let http = format!("{}:8000", lab.ip(30));
    let healthy = || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&http.parse().unwrap(), Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 200")
    };
    assert!(wait_until(Duration::from_secs(120), healthy), "the router never served");

    // What the healthy cluster answers.
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![1 + i, 5 + 2 * i, 9, 3 + i]).collect();
    let expected: Vec<String> = prompts.iter().map(|p| complete(&http, p).expect("a healthy answer")).collect();
    let load = Load::start(&http, &prompts, &expected, 4);
    load.progresses(8, "before any fault");

    // 1. The leader is cut off: the others elect a new one; requests go on.
    let leader = coordinator_status(&lab, &list).expect("the coordinators answer")["leader"].as_u64().unwrap();
    lab.partition(&format!("c{leader}"), true);
    let cut = std::time::Instant::now();
    let others: Vec<String> = (1..=3).filter(|&i| i != leader).map(|i| coordinators[i as usize - 1].clone()).collect();
    let elected = wait_until(Duration::from_secs(30), || {
        coordinator_status(&lab, &others.join(","))
            .is_some_and(|s| s["leader"].as_u64().is_some_and(|l| l != leader && l != 0))
    });
    assert!(elected, "no new leader while coordinator {leader} was cut off");
    println!("chaos: leader cut off → a new leader in {:.2} s", cut.elapsed().as_secs_f64());
    load.progresses(4, "with the old leader cut off");
    lab.partition(&format!("c{leader}"), false);

    // 2. The router is cut off for a few seconds: its requests wait, then complete.
    lab.partition("router", true);
    let before = load.ok();
    std::thread::sleep(Duration::from_secs(3)); // the fault's duration, not a wait for a state
    let during = load.ok() - before;
    lab.partition("router", false);
    // At most the answers already on their way when the cut came (one per client).
    assert!(during <= 4, "{during} requests answered through a router that was cut off");
    load.progresses(8, "after the router came back");

    // 3. An expert node answers slowly.
    lab.slow("n1", true);
    load.progresses(8, "with a slow node");
    lab.slow("n1", false);

    // 4. A node that adds 50 to every partial sum joins (it holds a valid certificate): the
    //    router's canary catches it before any answer of its is used, and it is drained.
    node(&mut lab, "rogue", 23, &[("SWITCHYARD_FAULT_WRONG_ANSWERS", "50")]);
    let joined = std::time::Instant::now();
    let rogue = format!("{}:7001", lab.ip(23));
    let drained = wait_until(Duration::from_secs(90), || {
        coordinator_status(&lab, &list).is_some_and(|s| {
            s["nodes"].as_array().is_some_and(|nodes| {
                nodes
                    .iter()
                    .any(|n| n["address"] == rogue.as_str() && (n["state"] == "draining" || n["state"] == "dead"))
            })
        })
    });
    assert!(drained, "the wrong node was not drained: {:#}", coordinator_status(&lab, &list).unwrap_or_default());
    println!("chaos: wrong node started → drained in {:.2} s", joined.elapsed().as_secs_f64());
    load.progresses(8, "after the wrong node was drained");

    let (ok, failed, wrong) = load.finish();
    println!("chaos: {ok} requests answered, {failed} failed, {wrong} wrong");
    assert_eq!((failed, wrong), (0, 0), "{ok} answered");
}
