//! `braid status`: the job as its coordinator sees it (the `Status` RPC, the same document as
//! `GET /status` on the coordinator's port), over TLS and with the bearer token when asked.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use braid_coordinator::CoordinatorClient;
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
    #[command(flatten)]
    security: super::security::ClientSecurityArgs,
}

/// Runs `braid status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let security = args.security.load()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = runtime
        .block_on(async {
            let client = CoordinatorClient::connect_secured(&args.coordinator, "", Duration::from_secs(5), &security).await?;
            client.status_json().await
        })
        .with_context(|| format!("asking {} for the job's status", args.coordinator))?;
    let status: Value = serde_json::from_str(&body).with_context(|| format!("{} answered with no JSON status", args.coordinator))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(ExitCode::SUCCESS)
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
    out.push_str("\nworker       host             rank  state                last step  step s   wait s   GPU memory            straggler\n");
    for m in s["members"].as_array().into_iter().flatten() {
        let memory = braid_coordinator::status_page::device_memory(m["device_memory_bytes"].as_u64(), m["device_memory_peak_bytes"].as_u64());
        out.push_str(&format!(
            "{:<12} {:<16} {:<5} {:<20} {:<10} {:<8} {:<8} {memory:<21} {}\n",
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
