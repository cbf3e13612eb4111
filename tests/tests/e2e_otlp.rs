//! OTLP export of a real job: a collector-protocol receiver (the OTLP/gRPC trace and metrics
//! services, from the opentelemetry-proto definitions) in the test, a coordinator and two
//! workers sending to it, and the spans and metrics that arrive, with their names, attributes
//! and nesting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use braid_tests::{free_port, read_logs, spawn_logged, synth_data, JobFile};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};

/// A span as received: its service, name, attributes, id and parent's id.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    job: String,
    name: String,
    attributes: BTreeMap<String, String>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

/// A metric data point as received.
#[derive(Debug, Clone)]
struct Point {
    service: String,
    name: String,
    attributes: BTreeMap<String, String>,
    value: f64,
}

#[derive(Default, Clone)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    points: Arc<Mutex<Vec<Point>>>,
}

fn text(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = text(&resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Span {
                    service: resource.get("service.name").cloned().unwrap_or_default(),
                    job: resource.get("braid.job").cloned().unwrap_or_default(),
                    name: span.name,
                    attributes: text(&span.attributes),
                    id: span.span_id,
                    parent: span.parent_span_id,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut points = self.points.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            let resource = text(&resource_metrics.resource.map(|r| r.attributes).unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for m in resource_metrics.scope_metrics.into_iter().flat_map(|s| s.metrics) {
                let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match p.value {
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    Some(number_data_point::Value::AsInt(i)) => i as f64,
                    None => f64::NAN,
                };
                let found: Vec<(BTreeMap<String, String>, f64)> = match &m.data {
                    Some(metric::Data::Gauge(g)) => g.data_points.iter().map(|p| (text(&p.attributes), number(p))).collect(),
                    Some(metric::Data::Sum(s)) => s.data_points.iter().map(|p| (text(&p.attributes), number(p))).collect(),
                    Some(metric::Data::Histogram(h)) => h.data_points.iter().map(|p| (text(&p.attributes), p.count as f64)).collect(),
                    _ => Vec::new(),
                };
                points.extend(found.into_iter().map(|(attributes, value)| Point { service: service.clone(), name: m.name.clone(), attributes, value }));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[test]
fn a_jobs_spans_and_metrics_arrive_over_otlp() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let received = Received::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let collector = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(received.clone()))
        .add_service(MetricsServiceServer::new(received.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    runtime.spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let data = synth_data(&dir.path().join("data"), 200, 20, 100);
    let job = JobFile { workers: 2, steps: 12, checkpoint: Some(dir.path().join("ckpt")), every_steps: 5, ..JobFile::new("otlp", &data) }
        .to_toml()
        + &format!("\n[telemetry]\notlp_endpoint = \"http://{collector}\"\notlp_interval_s = 0.5\n");
    let job_path = dir.path().join("job.toml");
    std::fs::write(&job_path, job).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let spawn = |args: &[&str], log: &str| spawn_logged(&[], args, &logs.join(log));
    let mut coordinator = spawn(&["coordinator", "--job", job_path.to_str().unwrap(), "--listen", &address], "coordinator.log");
    let worker = ["worker", "--coordinator", &address, "--advertise-host", "127.0.0.1"];
    let json_worker = [&worker[..], &["--json-logs"]].concat();
    let mut workers = [spawn(&json_worker, "worker-0.log"), spawn(&json_worker, "worker-1.log")];
    let deadline = Instant::now() + Duration::from_secs(180);
    for w in &mut workers {
        assert!(w.wait_until(deadline, || read_logs(&logs)).success(), "{}", read_logs(&logs));
    }
    assert!(coordinator.wait_until(deadline, || read_logs(&logs)).success(), "{}", read_logs(&logs));

    // JSON log lines of a training step name the job, worker, generation, rank and step (rank 0,
    // whichever worker it is, logs the steps and uploads the checkpoints).
    let json_log = ["worker-0.log", "worker-1.log"].map(|f| std::fs::read_to_string(logs.join(f)).unwrap()).concat();
    let step_lines: Vec<serde_json::Value> = json_log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "step" || v["fields"]["message"] == "checkpoint uploaded")
        .collect();
    assert!(step_lines.len() >= 4, "{json_log}");
    for line in &step_lines {
        let spans = line["spans"].as_array().unwrap_or_else(|| panic!("no spans: {line}"));
        let field = |key: &str| spans.iter().find_map(|s| s.get(key).cloned()).unwrap_or_else(|| panic!("no {key}: {line}"));
        assert_eq!(field("job"), "otlp");
        assert!(field("worker_id").as_str().is_some_and(|w| w.starts_with("w-")));
        assert_eq!(field("generation"), 1);
        assert!(field("rank").is_u64() && field("step").is_u64(), "{line}");
    }
    let spans = received.spans.lock().unwrap().clone();
    let points = received.points.lock().unwrap().clone();
    let names = |service: &str| -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in spans.iter().filter(|s| s.service == service) {
            *counts.entry(s.name.clone()).or_insert(0) += 1;
        }
        counts
    };
    let worker_spans = names("braid-worker");
    let coordinator_spans = names("braid-coordinator");
    println!("worker spans: {worker_spans:?}\ncoordinator spans: {coordinator_spans:?}");
    assert!(spans.iter().all(|s| s.job == "otlp"), "every span names the job");
    let ours = ["worker", "generation", "step", "data_wait", "forward", "backward", "all_reduce", "optimizer", "report", "checkpoint", "join", "generation_change", "commit"];
    let foreign: Vec<&str> = spans.iter().map(|s| s.name.as_str()).filter(|n| !ours.contains(n)).collect();
    assert!(foreign.is_empty(), "spans that are not braid's: {foreign:?}");

    // Every step of every rank, with its phases nested under it.
    assert_eq!(worker_spans.get("step"), Some(&24), "12 steps on each of 2 ranks");
    for phase in ["data_wait", "forward", "backward", "all_reduce", "optimizer", "report"] {
        assert_eq!(worker_spans.get(phase), Some(&24), "{phase}");
    }
    assert!(worker_spans.get("checkpoint").is_some_and(|&n| n >= 6), "checkpoints at steps 4, 9 and 11 on 2 ranks");
    let by_id: BTreeMap<&[u8], &Span> = spans.iter().map(|s| (s.id.as_slice(), s)).collect();
    for span in spans.iter().filter(|s| ["data_wait", "forward", "backward", "all_reduce", "optimizer"].contains(&s.name.as_str())) {
        let parent = by_id.get(span.parent.as_slice()).unwrap_or_else(|| panic!("{span:?} has no parent"));
        assert_eq!(parent.name, "step", "{span:?}");
    }
    let steps: Vec<u64> = spans.iter().filter(|s| s.name == "step").filter_map(|s| s.attributes.get("step")?.parse().ok()).collect();
    assert_eq!(steps.iter().copied().max(), Some(11));
    let generation = spans.iter().find(|s| s.name == "generation" && s.service == "braid-worker").expect("a generation span");
    assert_eq!((generation.attributes["generation"].as_str(), generation.attributes["world_size"].as_str()), ("1", "2"));

    // The coordinator's events: two joins, the generation forming, the commits.
    assert_eq!(coordinator_spans.get("join"), Some(&2));
    assert!(coordinator_spans.get("generation_change").is_some_and(|&n| n >= 1));
    let commits: Vec<&str> = spans.iter().filter(|s| s.name == "commit").map(|s| s.attributes["step"].as_str()).collect();
    assert!(commits.contains(&"4") && commits.contains(&"11"), "{commits:?}");

    // Metrics: the job's series from the coordinator, each rank's timings from the workers.
    let latest = |service: &str, name: &str| {
        points.iter().rev().find(|p| p.service == service && p.name == name).unwrap_or_else(|| panic!("no {name} from {service}"))
    };
    let step = latest("braid-coordinator", "braid_step");
    assert_eq!((step.value, step.attributes["job_name"].as_str()), (12.0, "otlp"));
    assert_eq!(latest("braid-coordinator", "braid_job_finished").value, 1.0);
    assert!(latest("braid-coordinator", "braid_loss").value > 0.0);
    assert!(latest("braid-coordinator", "braid_checkpoints_total").value >= 3.0);
    let timings = latest("braid-worker", "braid_worker_step_seconds");
    assert!(timings.value >= 1.0 && timings.attributes.contains_key("rank"), "{timings:?}");
    assert_eq!(latest("braid-worker", "braid_worker_step").value, 11.0);
    // CPU workers have no GPU memory figures, so neither side exports any.
    let memory = ["braid_worker_device_memory_bytes", "braid_worker_device_memory_peak_bytes", "braid_rank_device_memory_bytes", "braid_rank_device_memory_peak_bytes"];
    let found: Vec<&str> = points.iter().map(|p| p.name.as_str()).filter(|n| memory.contains(n)).collect();
    assert!(found.is_empty(), "GPU memory points from CPU workers: {found:?}");
}
