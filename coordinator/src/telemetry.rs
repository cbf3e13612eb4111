//! Logs, traces and metrics leaving the process.
//!
//! [`Telemetry::init`] installs the log output (text or JSON lines on stderr, filtered by
//! `RUST_LOG`) with an empty slot for OpenTelemetry; [`Telemetry::export`] fills it once the
//! job's `[telemetry] otlp_endpoint` is known (a worker learns it when it joins), sending
//! spans through `tracing-opentelemetry` and metrics through the OTLP/gRPC exporter.
//! [`observe_job`] publishes the coordinator's job-level series (the same families as
//! `/metrics`) as OpenTelemetry instruments.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::metrics::Meter;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::TelemetrySection;
use crate::error::{Error, Result};
use crate::metrics::{self, Kind};
use crate::state::Progress;

/// The OpenTelemetry layer's slot in the subscriber.
type OtelSlot = Option<Box<dyn Layer<Registry> + Send + Sync>>;

/// The process's telemetry: the log output, and the OTLP exporters once started. Shut it down
/// before the process exits so the last spans and metrics are sent.
pub struct Telemetry {
    slot: Option<reload::Handle<OtelSlot, Registry>>,
    providers: Mutex<Option<(SdkTracerProvider, SdkMeterProvider)>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exporting = self.providers.lock().map(|p| p.is_some()).unwrap_or(false);
        f.debug_struct("Telemetry").field("exporting", &exporting).finish()
    }
}

/// Who is exporting, for the OpenTelemetry resource.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `service.name`: `braid-coordinator` or `braid-worker`.
    pub service: &'static str,
    /// The job's name (`braid.job`).
    pub job: String,
    /// The worker id, for a worker (`braid.worker_id`).
    pub worker_id: Option<String>,
}

impl Telemetry {
    /// Installs the log output as the global subscriber, once per process: JSON lines with
    /// `json`, otherwise text, both on stderr, filtered by `RUST_LOG` (default
    /// `default_filter`). Later calls return the first one's handle. When another subscriber
    /// is already installed (a test harness), the handle exports no spans.
    pub fn init(json: bool, default_filter: &str) -> &'static Self {
        INSTALLED.get_or_init(|| {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
            let (otel, slot) = reload::Layer::new(None as OtelSlot);
            let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
            let fmt: Box<dyn Layer<_> + Send + Sync> = if json { Box::new(fmt.json()) } else { Box::new(fmt) };
            let installed = tracing_subscriber::registry().with(otel).with(fmt.with_filter(filter)).try_init().is_ok();
            Self { slot: installed.then_some(slot), providers: Mutex::new(None) }
        })
    }

    /// The handle [`Telemetry::init`] installed, if it ran.
    pub fn installed() -> Option<&'static Self> {
        INSTALLED.get()
    }

    /// Starts exporting spans and metrics over OTLP/gRPC to `telemetry.otlp_endpoint` (nothing
    /// when it is unset), metrics every `telemetry.otlp_interval_s`. Call from inside a tokio
    /// runtime that outlives the export (the gRPC channel runs on it).
    pub fn export(&self, telemetry: &TelemetrySection, origin: &Origin) -> Result<()> {
        let Some(endpoint) = telemetry.otlp_endpoint.as_deref() else { return Ok(()) };
        let mut attributes = vec![KeyValue::new("braid.job", origin.job.clone())];
        if let Some(id) = &origin.worker_id {
            attributes.push(KeyValue::new("braid.worker_id", id.clone()));
        }
        let resource = Resource::builder().with_service_name(origin.service).with_attributes(attributes).build();
        let failed = |what: &str, e: &dyn std::fmt::Display| Error::Serve(format!("OTLP {what} exporter for {endpoint}: {e}"));
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| failed("span", &e))?;
        let tracers = SdkTracerProvider::builder().with_batch_exporter(spans).with_resource(resource.clone()).build();
        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| failed("metric", &e))?;
        let interval = Duration::from_secs_f64(telemetry.otlp_interval_s.max(0.1));
        let reader = PeriodicReader::builder(metric_exporter).with_interval(interval).build();
        let meters = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
        opentelemetry::global::set_meter_provider(meters.clone());
        if let Some(slot) = &self.slot {
            // braid's own spans only: the gRPC stack's (h2, tonic) would include the exporter's
            // own traffic.
            let ours = Targets::new().with_target("braid", Level::INFO).with_target("braid_coordinator", Level::INFO);
            let layer = tracing_opentelemetry::layer().with_tracer(tracers.tracer("braid")).with_filter(ours);
            slot.reload(Some(Box::new(layer) as Box<dyn Layer<Registry> + Send + Sync>))
                .map_err(|e| Error::Serve(format!("installing the OpenTelemetry layer: {e}")))?;
        }
        *self.providers.lock().unwrap_or_else(|e| e.into_inner()) = Some((tracers, meters));
        tracing::info!("exporting spans and metrics over OTLP to {endpoint} every {:.1} s", interval.as_secs_f64());
        Ok(())
    }

    /// True once [`Telemetry::export`] started the exporters.
    pub fn is_exporting(&self) -> bool {
        self.providers.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Sends what is buffered and stops the exporters.
    pub fn shutdown(&self) {
        let Some((tracers, meters)) = self.providers.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        if let Some(slot) = &self.slot {
            let _ = slot.reload(None);
        }
        if let Err(e) = tracers.shutdown() {
            eprintln!("OTLP: flushing spans: {e}");
        }
        if let Err(e) = meters.shutdown() {
            eprintln!("OTLP: flushing metrics: {e}");
        }
    }
}

/// The process's telemetry, once [`Telemetry::init`] ran.
static INSTALLED: OnceLock<Telemetry> = OnceLock::new();

/// How long one reading of the job's families serves the instruments' callbacks: one export
/// calls them all within a few milliseconds, so the job is read once per export, not once per
/// family.
const READING_TTL: Duration = Duration::from_millis(200);

/// The job's name and its metric families, as read at one moment.
type Families = Arc<(String, Vec<metrics::Family>)>;

/// The job's metric families as last read, shared by every instrument's callback.
struct Reading<F> {
    progress: F,
    last: Mutex<Option<(Instant, Families)>>,
}

impl<F: Fn() -> Progress> Reading<F> {
    /// The job's name and families, read again when the last reading is older than
    /// [`READING_TTL`].
    fn families(&self) -> Families {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some((at, reading)) if at.elapsed() < READING_TTL => reading.clone(),
            _ => {
                let p = (self.progress)();
                let reading = Arc::new((p.job.clone(), metrics::families(&p)));
                *last = Some((Instant::now(), reading.clone()));
                reading
            }
        }
    }

    /// Family `name`'s samples with `job_name` and their labels as attributes.
    fn observe(&self, name: &str) -> Vec<(f64, Vec<KeyValue>)> {
        let reading = self.families();
        let (job, families) = &*reading;
        let Some(family) = families.iter().find(|f| f.name == name) else { return Vec::new() };
        family
            .samples
            .iter()
            .map(|(labels, value)| {
                let mut attributes = vec![KeyValue::new("job_name", job.clone())];
                attributes.extend(labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())));
                (*value, attributes)
            })
            .collect()
    }
}

/// Publishes every `/metrics` family of the job as an OpenTelemetry instrument of the same
/// name on `meter`, read from `progress` at each export; samples carry `job_name` and their
/// labels as attributes. Returns the instruments (keep them for the export's life).
pub fn observe_job(meter: &Meter, progress: impl Fn() -> Progress + Send + Sync + 'static) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let first = progress();
    let reading = Arc::new(Reading { progress, last: Mutex::new(None) });
    let mut instruments: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    for family in metrics::families(&first) {
        let (name, read) = (family.name, reading.clone());
        let report = move |observe: &dyn Fn(f64, &[KeyValue])| {
            for (value, attributes) in read.observe(name) {
                observe(value, &attributes);
            }
        };
        match family.kind {
            Kind::Gauge => instruments.push(Box::new(
                meter
                    .f64_observable_gauge(name)
                    .with_description(family.help)
                    .with_callback(move |observer| report(&|v, a| observer.observe(v, a)))
                    .build(),
            )),
            Kind::Counter => instruments.push(Box::new(
                meter
                    .f64_observable_counter(name)
                    .with_description(family.help)
                    .with_callback(move |observer| report(&|v, a| observer.observe(v, a)))
                    .build(),
            )),
        }
    }
    instruments
}
