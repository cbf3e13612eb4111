//! `braid status`: the job as its coordinator sees it (`GET /status` on the coordinator's port).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

/// Options of `braid status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Coordinator address, host:port.
    #[arg(long, env = "BRAID_COORDINATOR")]
    coordinator: String,
    /// Print the coordinator's JSON as is.
    #[arg(long)]
    json: bool,
}

/// Runs `braid status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let body = http_get(&args.coordinator, "/status").with_context(|| format!("asking {} for /status", args.coordinator))?;
    let status: Value = serde_json::from_str(&body).with_context(|| format!("{} answered /status with no JSON", args.coordinator))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// A plain HTTP/1.1 GET of `path` on `address`; returns the body of a 200 reply.
fn http_get(address: &str, path: &str) -> anyhow::Result<String> {
    let address = address.trim_start_matches("http://");
    let target = address.to_socket_addrs()?.next().with_context(|| format!("{address} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: application/json\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").context("the reply has no HTTP header")?;
    let status_line = head.lines().next().unwrap_or_default();
    anyhow::ensure!(status_line.split_whitespace().nth(1) == Some("200"), "the coordinator answered {status_line:?}");
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok(if chunked { dechunk(body)? } else { body.to_string() })
}

/// The payload of a chunked HTTP body.
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("a chunk without a size line")?;
        let size = usize::from_str_radix(size.trim(), 16).with_context(|| format!("chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(rest.len() >= size, "a chunk shorter than its size");
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.3}") }),
        other => other.to_string(),
    }
}

/// The terminal view of a `/status` document.
fn render(s: &Value) -> String {
    let mut out = String::new();
    let state = if s["finished"] == true {
        "finished".to_string()
    } else if let Some(f) = s["failure"].as_str() {
        format!("FAILED: {f}")
    } else if !s["preempted_after"].is_null() {
        format!("stopped after the checkpoint of step {}", text(&s["preempted_after"]))
    } else if let Some(why) = s["waiting_reason"].as_str() {
        format!("waiting: {why}")
    } else {
        "training".to_string()
    };
    out.push_str(&format!("job {}: {state}\n", text(&s["job"])));
    out.push_str(&format!(
        "step {} of {}; generation {} with {} worker(s); loss {}; {} samples/s; {} rejoin(s)\n",
        text(&s["steps_done"]),
        text(&s["total_steps"]),
        text(&s["generation"]),
        text(&s["world_size"]),
        text(&s["loss"]),
        text(&s["samples_per_second"]),
        text(&s["rejoins"]),
    ));
    if let Some(terms) = s["loss_terms"].as_object().filter(|t| !t.is_empty()) {
        let terms: Vec<String> = terms.iter().map(|(term, value)| format!("{term} {}", text(value))).collect();
        out.push_str(&format!("loss terms: {}\n", terms.join(", ")));
    }
    out.push_str("\nworker       host             rank  state                last step  step s   wait s   straggler\n");
    for m in s["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<12} {:<16} {:<5} {:<20} {:<10} {:<8} {:<8} {}\n",
            text(&m["worker_id"]),
            text(&m["hostname"]),
            text(&m["rank"]),
            text(&m["state"]),
            text(&m["last_step"]),
            text(&m["step_seconds"]),
            text(&m["collective_wait_seconds"]),
            if m["straggler"] == true { "YES" } else { "" }
        ));
    }
    let history: Vec<&Value> = s["generation_history"].as_array().into_iter().flatten().collect();
    if !history.is_empty() {
        out.push_str("\ngenerations (newest last):\n");
        for g in history.iter().rev().take(5).rev() {
            out.push_str(&format!(
                "  {}: {} worker(s) from step {} ({}); formed: {}; ended: {}\n",
                text(&g["number"]),
                text(&g["world_size"]),
                text(&g["start_step"]),
                text(&g["source"]),
                text(&g["formed"]),
                text(&g["ended"]),
            ));
        }
    }
    if let Some(latest) = s["checkpoints"].as_array().and_then(|c| c.last()) {
        out.push_str(&format!("\nlatest checkpoint: step {} at {}\n", text(&latest["step"]), text(&latest["manifest_url"])));
    }
    if let Some(cost) = s["last_checkpoint"].as_object() {
        let bytes = cost["bytes"].as_u64().map_or_else(|| "-".to_string(), braid_coordinator::status_page::bytes);
        out.push_str(&format!("last checkpoint cost: step {}, {bytes} in {} s\n", text(&cost["step"]), text(&cost["seconds"])));
    }
    out
}
