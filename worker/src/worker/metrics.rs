//! The worker's own OpenTelemetry metrics, exported over OTLP when `[telemetry] otlp_endpoint`
//! is set (they are no-ops otherwise). The same numbers also reach the coordinator in every
//! step report, which serves them at `/metrics`.

use opentelemetry::metrics::{Counter, Gauge, Histogram};
use opentelemetry::KeyValue;

use braid_proto::StepReport;

/// Instruments for each step this worker trains.
pub struct WorkerMetrics {
    step_seconds: Histogram<f64>,
    data_wait_seconds: Histogram<f64>,
    collective_wait_seconds: Histogram<f64>,
    loss: Gauge<f64>,
    step: Gauge<u64>,
    samples: Counter<u64>,
    device_memory_bytes: Gauge<u64>,
    device_memory_peak_bytes: Gauge<u64>,
    job: KeyValue,
    worker: KeyValue,
}

impl WorkerMetrics {
    /// Instruments on the global meter provider, labelled with `job` and `worker_id`.
    pub fn new(job: &str, worker_id: &str) -> Self {
        let meter = opentelemetry::global::meter("braid");
        let seconds = |name: &'static str, description: &'static str| {
            meter.f64_histogram(name).with_description(description).with_unit("s").build()
        };
        Self {
            step_seconds: seconds("braid_worker_step_seconds", "Wall time of each training step on this rank."),
            data_wait_seconds: seconds("braid_worker_data_wait_seconds", "Time each step waited for its batch."),
            collective_wait_seconds: seconds(
                "braid_worker_collective_wait_seconds",
                "Time each step waited in collectives (gathers and gradient reductions).",
            ),
            loss: meter.f64_gauge("braid_worker_loss").with_description("Global-batch loss of the latest step.").build(),
            step: meter.u64_gauge("braid_worker_step").with_description("The latest global step this rank trained.").build(),
            samples: meter
                .u64_counter("braid_worker_samples")
                .with_description("Global-batch samples of the steps this rank trained.")
                .build(),
            device_memory_bytes: meter
                .u64_gauge("braid_worker_device_memory_bytes")
                .with_description("Bytes this rank's CUDA caching allocator reserved from the device after the latest step.")
                .with_unit("By")
                .build(),
            device_memory_peak_bytes: meter
                .u64_gauge("braid_worker_device_memory_peak_bytes")
                .with_description("The most bytes this rank's CUDA caching allocator reserved since the worker started.")
                .with_unit("By")
                .build(),
            job: KeyValue::new("job_name", job.to_string()),
            worker: KeyValue::new("worker", worker_id.to_string()),
        }
    }

    /// Records the step `report` describes, trained as rank `rank`; the GPU memory gauges only
    /// when the report carries them (a CUDA device).
    pub fn record(&self, rank: usize, report: &StepReport) {
        let attributes = [self.job.clone(), self.worker.clone(), KeyValue::new("rank", rank as i64)];
        self.step_seconds.record(report.step_seconds, &attributes);
        self.data_wait_seconds.record(report.data_wait_seconds, &attributes);
        self.collective_wait_seconds.record(report.collective_wait_seconds, &attributes);
        self.loss.record(report.loss, &attributes);
        self.step.record(report.step, &attributes);
        self.samples.add(report.samples, &attributes);
        if let Some(bytes) = report.device_memory_bytes {
            self.device_memory_bytes.record(bytes, &attributes);
        }
        if let Some(bytes) = report.device_memory_peak_bytes {
            self.device_memory_peak_bytes.record(bytes, &attributes);
        }
    }
}
