//! Plain Kubernetes manifests for one job: the job file as a ConfigMap, the coordinator as a
//! one-replica Deployment with a Service, a PodDisruptionBudget and a Prometheus Operator
//! ServiceMonitor, the workers as an indexed Job, and a `kustomization.yaml` listing them.
//!
//! Objects are named after the job (`<job>-coordinator`, `<job>-worker`, `<job>-job`), made a
//! DNS-1123 label, and carry `app.kubernetes.io/name: braid`, `app.kubernetes.io/instance:
//! <job>` and `app.kubernetes.io/component: coordinator|worker`.
//!
//! One worker process drives one GPU. A worker pod holds `gpus_per_worker` GPUs and runs that
//! many `braid worker --device cuda:<i>` processes under a small bash launcher (like `braid run
//! --device cuda` on one machine), so ranks on one node talk through NVLink and shared memory
//! rather than the pod network. The launcher passes SIGTERM and SIGINT on to every worker (each
//! then asks the coordinator for a checkpoint and a stop) and, when one worker fails, kills the
//! others so that the pod restarts as a whole and all its workers rejoin at the next
//! generation. With one GPU per pod (the default) the pod runs `braid worker` directly.
//!
//! Workers reach each other at their pod IPs (`BRAID_ADVERTISE_HOST` from `status.podIP`) and
//! the coordinator through its Service, so no headless Service is needed. Secrets are only
//! referred to (`braid-auth`, `braid-object-store`, every reference optional), never written.

use std::collections::BTreeSet;
use std::path::Path;

use braid_coordinator::config::JobConfig;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{dns_label, DeployError, Document};

/// The coordinator's port: gRPC, gRPC health, `GET /status` and `GET /metrics`.
pub const COORDINATOR_PORT: u16 = 7070;
/// The name of the coordinator's port in the pod and the Service.
pub const PORT_NAME: &str = "grpc";
/// Where the coordinator's pod sees the job file.
pub const JOB_FILE_PATH: &str = "/etc/braid/job.toml";
/// The gRPC health service the coordinator's readiness probe asks about.
pub const COORDINATOR_SERVICE: &str = "braid.v1.Coordinator";
/// The Secret holding the token coordinator and workers authenticate with (key `token`).
pub const AUTH_SECRET: &str = "braid-auth";
/// The Secret holding object-store credentials, one key per environment variable.
pub const OBJECT_STORE_SECRET: &str = "braid-object-store";
/// The user and group the images run as (`deploy/docker/*.Dockerfile`).
pub const RUN_AS_USER: u32 = 10001;
/// Seconds a worker keeps trying to reach the coordinator: worker pods may start long before
/// the coordinator is ready, and a worker that gives up counts against the Job's backoffLimit.
pub const WORKER_CONNECT_TIMEOUT_S: u32 = 600;
/// The annotation on pod templates holding the sha256 of the job file they run.
pub const JOB_HASH_ANNOTATION: &str = "braid/job-sha256";
/// The longest suffix added to the job's name in an object name.
const LONGEST_SUFFIX: &str = "-coordinator";

/// Runs one `braid worker` per GPU of the pod; `$BRAID_GPUS_PER_POD` says how many, the
/// script's arguments are passed to every worker.
const MULTI_GPU_LAUNCHER: &str = r#"# One `braid worker` per GPU of this pod. SIGTERM and SIGINT go to every worker (each then asks
# the coordinator for a checkpoint and a stop). When one worker fails the others are killed, so
# the pod restarts as a whole and its workers rejoin together at the next generation.
: "${BRAID_GPUS_PER_POD:?must be the number of GPUs of this pod}"
pids=()
declare -A gpu_of
for ((gpu = 0; gpu < BRAID_GPUS_PER_POD; gpu++)); do
  braid worker --device "cuda:$gpu" "$@" &
  pids+=("$!")
  gpu_of[$!]=$gpu
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
while true; do
  ended=""
  wait -n -p ended "${pids[@]}"
  rc=$?
  if [[ -z $ended ]]; then
    # Interrupted by a signal (the trap passed it on), or no worker is left.
    if ((rc > 128)); then continue; fi
    break
  fi
  if ((rc != 0 && status == 0)); then
    echo "braid worker on cuda:${gpu_of[$ended]} exited with status $rc; stopping the other workers of this pod" >&2
    status=$rc
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
done
exit "$status"
"#;

/// A PersistentVolumeClaim mounted at the same path in every pod (`--pvc CLAIM:PATH`): where
/// local data, checkpoint and tokenizer paths of the job file live.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeClaim {
    /// The claim's name.
    pub claim: String,
    /// The absolute path the pods mount it at.
    pub mount_path: String,
}

impl std::str::FromStr for VolumeClaim {
    type Err = DeployError;

    /// Parses `CLAIM:PATH`.
    fn from_str(s: &str) -> Result<Self, DeployError> {
        let bad = |reason: &str| DeployError::Option { option: "--pvc".into(), value: s.into(), reason: reason.into() };
        let (claim, path) = s.split_once(':').ok_or_else(|| bad("use CLAIM:PATH, e.g. braid-data:/data"))?;
        if dns_label("--pvc claim", claim, 253).ok().as_deref() != Some(claim) {
            return Err(bad("the claim name must be lowercase letters, digits and '-', starting and ending with a letter or digit"));
        }
        if !Path::new(path).is_absolute() || path == "/" {
            return Err(bad("the mount path must be an absolute path below /"));
        }
        Ok(Self { claim: claim.into(), mount_path: path.trim_end_matches('/').into() })
    }
}

/// The options of a rendering: the flags of `braid deploy k8s`.
#[derive(Debug, Clone, PartialEq)]
pub struct K8sOptions {
    /// The coordinator's image. Default `braid-coordinator:<braid version>`.
    pub image_coordinator: String,
    /// The workers' image. Default `braid-worker:<braid version>`.
    pub image_worker: String,
    /// The namespace written into every object; none leaves it to `kubectl`.
    pub namespace: Option<String>,
    /// Worker processes (sets `cluster.min_workers` and `max_workers`, as `braid run --workers`
    /// does); default the job's `cluster.max_workers`.
    pub workers: Option<usize>,
    /// GPUs, and so worker processes, per worker pod (cuda jobs). Default 1.
    pub gpus_per_worker: usize,
    /// Volume claims every pod mounts.
    pub volume_claims: Vec<VolumeClaim>,
    /// Render the ServiceMonitor (it needs the Prometheus Operator's CRDs). Default true.
    pub service_monitor: bool,
}

/// `<name>:<braid's version>`, the tag `deploy/README.md` builds the images with.
pub fn default_image(name: &str) -> String {
    format!("{name}:{}", env!("CARGO_PKG_VERSION"))
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self {
            image_coordinator: default_image("braid-coordinator"),
            image_worker: default_image("braid-worker"),
            namespace: None,
            workers: None,
            gpus_per_worker: 1,
            volume_claims: Vec::new(),
            service_monitor: true,
        }
    }
}

/// A job file as written: its text, and the job it describes.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFile {
    /// The file's text, comments and relative paths as they are.
    pub text: String,
    /// The parsed job; relative paths are not resolved, since the pods see other folders.
    pub config: JobConfig,
}

impl JobFile {
    /// Parses and validates a job file's `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DeployError> {
        let config = JobConfig::parse(text, origin)?;
        config.validate(origin)?;
        Ok(Self { text: text.to_string(), config })
    }
}

/// The manifests of one job and what the person deploying it should know.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendering {
    /// The job's name as the job file gives it.
    pub job_name: String,
    /// The documents, `kustomization.yaml` last.
    pub documents: Vec<Document>,
    /// Problems the manifests cannot fix, e.g. local paths no pod can see.
    pub warnings: Vec<String>,
}

/// The file name of the kustomization.
pub const KUSTOMIZATION: &str = "kustomization.yaml";

impl Rendering {
    /// Every document as (file name, YAML text).
    pub fn files(&self) -> Vec<(String, String)> {
        self.documents.iter().map(|d| (d.file.clone(), d.to_yaml(&self.job_name))).collect()
    }

    /// The objects as one multi-document YAML stream for `kubectl apply -f -` (the
    /// kustomization, which is no object, is left out).
    pub fn stream(&self) -> String {
        self.documents
            .iter()
            .filter(|d| d.file != KUSTOMIZATION)
            .map(|d| format!("---\n# {}\n{}", d.file, d.to_yaml(&self.job_name)))
            .collect()
    }
}

/// Renders the manifests of `job_file` with `options`. The ConfigMap holds the job file as
/// written; with `options.workers` it holds braid's canonical form of the job (every key, no
/// comments) with the new generation size instead.
pub fn render(job_file: &JobFile, options: &K8sOptions) -> Result<Rendering, DeployError> {
    let mut job = job_file.config.clone();
    let job_toml = match options.workers {
        None => job_file.text.clone(),
        Some(0) => return Err(option_error("--workers", 0, "need at least 1 worker")),
        Some(n) => {
            job.cluster.min_workers = n;
            job.cluster.max_workers = n;
            job.validate(&format!("job {:?} with --workers {n}", job.job.name))?;
            job.to_toml()
        }
    };
    let on_gpu = job.cluster.device.starts_with("cuda");
    let gpus = options.gpus_per_worker;
    let workers = job.cluster.max_workers;
    if gpus == 0 {
        return Err(option_error("--gpus-per-worker", gpus, "need at least 1"));
    }
    if !on_gpu && gpus != 1 {
        return Err(option_error(
            "--gpus-per-worker",
            gpus,
            &format!("the job runs on cluster.device = {:?}; GPUs per pod apply to cuda jobs", job.cluster.device),
        ));
    }
    if !workers.is_multiple_of(gpus) {
        return Err(option_error(
            "--gpus-per-worker",
            gpus,
            &format!("{workers} workers (one per GPU) do not fill pods of {gpus} GPUs; choose a divisor of {workers}"),
        ));
    }
    if let Some(ns) = &options.namespace {
        if dns_label("--namespace", ns, 63).ok().as_deref() != Some(ns.as_str()) {
            return Err(DeployError::Name {
                what: "--namespace".into(),
                name: ns.clone(),
                reason: "a namespace is lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit".into(),
            });
        }
    }
    let base = dns_label("job.name", &job.job.name, 63 - LONGEST_SUFFIX.len())?;
    let names = Names {
        config_map: format!("{base}-job"),
        coordinator: format!("{base}-coordinator"),
        worker: format!("{base}-worker"),
        base,
    };
    let job_hash = hex::encode(Sha256::digest(job_toml.as_bytes()));
    let ctx = Context { job: &job, options, names: &names, job_hash };

    let mut documents = vec![
        Document { file: "configmap.yaml".into(), value: ctx.config_map(&job_toml) },
        Document { file: "coordinator-deployment.yaml".into(), value: ctx.coordinator_deployment() },
        Document { file: "coordinator-service.yaml".into(), value: ctx.coordinator_service() },
        Document { file: "coordinator-pdb.yaml".into(), value: ctx.coordinator_pdb() },
        Document { file: "worker-job.yaml".into(), value: ctx.worker_job(on_gpu, workers / gpus) },
    ];
    if options.service_monitor {
        documents.push(Document { file: "servicemonitor.yaml".into(), value: ctx.service_monitor() });
    }
    let resources: Vec<&str> = documents.iter().map(|d| d.file.as_str()).collect();
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
    });
    documents.push(Document { file: KUSTOMIZATION.into(), value: kustomization });
    Ok(Rendering { job_name: job.job.name.clone(), documents, warnings: storage_warnings(&job, &options.volume_claims) })
}

fn option_error(option: &str, value: impl ToString, reason: &str) -> DeployError {
    DeployError::Option { option: option.into(), value: value.to_string(), reason: reason.into() }
}

/// The object names of one job.
struct Names {
    base: String,
    config_map: String,
    coordinator: String,
    worker: String,
}

/// What every object builder reads.
struct Context<'a> {
    job: &'a JobConfig,
    options: &'a K8sOptions,
    names: &'a Names,
    job_hash: String,
}

impl Context<'_> {
    fn labels(&self, component: Option<&str>) -> Value {
        let mut labels = json!({
            "app.kubernetes.io/name": "braid",
            "app.kubernetes.io/instance": self.names.base,
        });
        if let Some(component) = component {
            labels["app.kubernetes.io/component"] = json!(component);
        }
        labels
    }

    fn metadata(&self, name: &str, component: Option<&str>) -> Value {
        let mut metadata = json!({"name": name, "labels": self.labels(component)});
        if let Some(ns) = &self.options.namespace {
            metadata["namespace"] = json!(ns);
        }
        metadata
    }

    fn config_map(&self, job_toml: &str) -> Value {
        let file = Path::new(JOB_FILE_PATH).file_name().and_then(|f| f.to_str()).expect("JOB_FILE_PATH names a file");
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.metadata(&self.names.config_map, None),
            "data": {file: job_toml},
        })
    }

    /// Seconds Kubernetes waits after SIGTERM: the job's grace period to checkpoint, and 30 more.
    fn termination_grace_s(&self) -> u64 {
        self.job.checkpoint.grace_period_s.ceil() as u64 + 30
    }

    /// Environment both coordinator and workers get: the auth token and object-store credentials.
    fn shared_env(&self) -> Vec<Value> {
        let mut env = vec![secret_env("BRAID_AUTH_TOKEN", AUTH_SECRET, "token")];
        let backends = backends(self.job);
        let mut store = vec!["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"];
        if backends.contains(Backend::S3.name()) {
            store.extend(["AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"]);
        }
        if backends.contains(Backend::Gcs.name()) {
            store.push("GOOGLE_SERVICE_ACCOUNT_KEY");
        }
        if backends.contains(Backend::Azure.name()) {
            store.extend(["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"]);
        }
        env.extend(store.into_iter().map(|var| secret_env(var, OBJECT_STORE_SECRET, var)));
        env
    }

    fn claim_volumes(&self) -> Vec<Value> {
        let claims = self.options.volume_claims.iter().enumerate();
        claims.map(|(i, c)| json!({"name": format!("claim-{i}"), "persistentVolumeClaim": {"claimName": c.claim}})).collect()
    }

    fn claim_mounts(&self) -> Vec<Value> {
        let claims = self.options.volume_claims.iter().enumerate();
        claims.map(|(i, c)| json!({"name": format!("claim-{i}"), "mountPath": c.mount_path})).collect()
    }

    fn coordinator_deployment(&self) -> Value {
        let labels = self.labels(Some("coordinator"));
        let mut env = vec![json!({"name": "BRAID_WAIT_FOR_LEASE", "value": "true"})];
        env.extend(self.shared_env());
        let job_dir = Path::new(JOB_FILE_PATH).parent().expect("JOB_FILE_PATH has a folder").to_str().expect("utf-8");
        let mut mounts = vec![json!({"name": "job", "mountPath": job_dir, "readOnly": true})];
        mounts.extend(self.claim_mounts());
        let mut volumes = vec![json!({"name": "job", "configMap": {"name": self.names.config_map}})];
        volumes.extend(self.claim_volumes());
        let grpc = |service: Option<&str>| {
            let mut probe = json!({"port": COORDINATOR_PORT});
            if let Some(service) = service {
                probe["service"] = json!(service);
            }
            probe
        };
        // With --wait-for-lease (BRAID_WAIT_FOR_LEASE) a restarted coordinator first waits for
        // the lease of the one it replaces to expire: give it two leases and two minutes.
        let startup_s = 2.0 * self.job.cluster.coordinator_lease_s + 120.0;
        let container = json!({
            "name": "coordinator",
            "image": self.options.image_coordinator,
            "command": ["braid-coordinator"],
            "args": ["--job", JOB_FILE_PATH, "--listen", format!("0.0.0.0:{COORDINATOR_PORT}")],
            "env": env,
            "ports": [{"name": PORT_NAME, "containerPort": COORDINATOR_PORT, "protocol": "TCP"}],
            "startupProbe": {"grpc": grpc(None), "periodSeconds": 5, "failureThreshold": (startup_s / 5.0).ceil() as u64},
            "readinessProbe": {"grpc": grpc(Some(COORDINATOR_SERVICE)), "periodSeconds": 5, "failureThreshold": 3},
            "livenessProbe": {"grpc": grpc(None), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
            "securityContext": container_security(),
            "volumeMounts": mounts,
        });
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.metadata(&self.names.coordinator, Some("coordinator")),
            "spec": {
                "replicas": 1,
                // Never two coordinators at once: the second would be refused the job's lease.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": {JOB_HASH_ANNOTATION: self.job_hash}},
                    "spec": {
                        "enableServiceLinks": false,
                        "securityContext": pod_security(),
                        "terminationGracePeriodSeconds": self.termination_grace_s(),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        })
    }

    fn coordinator_service(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.metadata(&self.names.coordinator, Some("coordinator")),
            "spec": {
                "type": "ClusterIP",
                "selector": self.labels(Some("coordinator")),
                "ports": [{"name": PORT_NAME, "port": COORDINATOR_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
            },
        })
    }

    fn coordinator_pdb(&self) -> Value {
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.metadata(&self.names.coordinator, Some("coordinator")),
            "spec": {"maxUnavailable": 0, "selector": {"matchLabels": self.labels(Some("coordinator"))}},
        })
    }

    fn worker_job(&self, on_gpu: bool, pods: usize) -> Value {
        let gpus = self.options.gpus_per_worker;
        let labels = self.labels(Some("worker"));
        let mut flags = vec!["--connect-timeout".to_string(), WORKER_CONNECT_TIMEOUT_S.to_string()];
        if self.job.telemetry.log_format == "json" {
            flags.push("--json-logs".into());
        }
        let mut env = vec![
            json!({"name": "BRAID_COORDINATOR", "value": format!("{}:{COORDINATOR_PORT}", self.names.coordinator)}),
            json!({"name": "BRAID_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        ];
        let command: Vec<String> = if gpus > 1 {
            env.push(json!({"name": "BRAID_GPUS_PER_POD", "value": gpus.to_string()}));
            ["bash", "-c", MULTI_GPU_LAUNCHER, "braid-workers"].into_iter().map(String::from).chain(flags).collect()
        } else {
            let device = if on_gpu { vec!["--device".to_string(), "cuda:0".to_string()] } else { vec![] };
            ["braid", "worker"].into_iter().map(String::from).chain(device).chain(flags).collect()
        };
        env.extend(self.shared_env());

        let data = &self.job.data;
        let cpu_per_worker = data.decode_threads + self.job.train.threads.max(1);
        let memory_gi_per_worker = if on_gpu { 16 } else { 4 };
        let memory = format!("{}Gi", gpus * memory_gi_per_worker);
        let mut resources = json!({
            "requests": {"cpu": (gpus * cpu_per_worker).to_string(), "memory": memory},
            "limits": {"memory": memory},
        });
        let mut mounts = self.claim_mounts();
        let mut volumes = self.claim_volumes();
        let mut tolerations = Vec::new();
        if on_gpu {
            resources["requests"]["nvidia.com/gpu"] = json!(gpus.to_string());
            resources["limits"]["nvidia.com/gpu"] = json!(gpus.to_string());
            // NCCL keeps its intra-node buffers in /dev/shm, which containers get 64 MiB of.
            mounts.push(json!({"name": "dshm", "mountPath": "/dev/shm"}));
            volumes.push(json!({"name": "dshm", "emptyDir": {"medium": "Memory"}}));
            tolerations.push(json!({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}));
        }
        let mut container = json!({
            "name": "worker",
            "image": self.options.image_worker,
            "command": command,
            "env": env,
            "resources": resources,
            "securityContext": container_security(),
        });
        let mut pod = json!({
            "restartPolicy": "OnFailure",
            "enableServiceLinks": false,
            "securityContext": pod_security(),
            "terminationGracePeriodSeconds": self.termination_grace_s(),
        });
        if !mounts.is_empty() {
            container["volumeMounts"] = json!(mounts);
            pod["volumes"] = json!(volumes);
        }
        if !tolerations.is_empty() {
            pod["tolerations"] = json!(tolerations);
        }
        pod["containers"] = json!([container]);
        json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self.metadata(&self.names.worker, Some("worker")),
            "spec": {
                "completionMode": "Indexed",
                "completions": pods,
                "parallelism": pods,
                "backoffLimit": self.job.cluster.max_restarts,
                "template": {
                    "metadata": {"labels": labels, "annotations": {JOB_HASH_ANNOTATION: self.job_hash}},
                    "spec": pod,
                },
            },
        })
    }

    fn service_monitor(&self) -> Value {
        json!({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": self.metadata(&self.names.coordinator, Some("coordinator")),
            "spec": {
                "selector": {"matchLabels": self.labels(Some("coordinator"))},
                "endpoints": [{"port": PORT_NAME, "path": "/metrics", "scheme": "http", "interval": "15s"}],
            },
        })
    }
}

fn secret_env(var: &str, secret: &str, key: &str) -> Value {
    json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": true}}})
}

fn pod_security() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER})
}

fn container_security() -> Value {
    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
}

/// Object-store backends, by the URL schemes that select them.
#[derive(Debug, Clone, Copy)]
enum Backend {
    S3,
    Gcs,
    Azure,
}

impl Backend {
    fn of_scheme(scheme: &str) -> Option<Self> {
        match scheme {
            "s3" | "s3a" => Some(Self::S3),
            "gs" => Some(Self::Gcs),
            "az" | "abfs" | "abfss" => Some(Self::Azure),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::S3 => "s3",
            Self::Gcs => "gcs",
            Self::Azure => "azure",
        }
    }
}

/// Every location in the job file, with its key.
fn locations(job: &JobConfig) -> Vec<(&'static str, &str)> {
    let mut found = vec![("data.train", job.data.train.as_str())];
    let optional = [
        ("data.eval", job.data.eval.as_deref()),
        ("data.classes", job.data.classes.as_deref()),
        ("data.tokenizer", Some(job.data.tokenizer.as_str()).filter(|t| *t != "clip-bpe")),
        ("model.init_from", job.model.init_from.as_deref()),
        ("checkpoint.url", job.checkpoint.url.as_deref()),
        ("telemetry.sample_ledger", job.telemetry.sample_ledger.as_deref()),
    ];
    found.extend(optional.into_iter().filter_map(|(key, value)| value.map(|v| (key, v))));
    found
}

/// The URL scheme of a location, lowercase; `None` for a plain path.
fn scheme(location: &str) -> Option<String> {
    location.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase())
}

/// The object-store backends the job's locations use, by [`Backend::name`].
fn backends(job: &JobConfig) -> BTreeSet<&'static str> {
    locations(job).into_iter().filter_map(|(_, l)| scheme(l)).filter_map(|s| Backend::of_scheme(&s)).map(Backend::name).collect()
}

/// Local paths the pods cannot see, and a missing checkpoint root.
fn storage_warnings(job: &JobConfig, claims: &[VolumeClaim]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (key, location) in locations(job) {
        let path = match scheme(location).as_deref() {
            None => location,
            Some("file") => location.split_once("://").map_or(location, |(_, p)| p),
            Some(_) => continue,
        };
        if Path::new(path).is_relative() {
            warnings.push(format!(
                "{key} = {location:?} is a relative path: in the coordinator's pod it resolves against {}, where the job \
                 file is mounted; give an absolute path on a volume the pods mount (--pvc CLAIM:PATH) or an object-store URL",
                Path::new(JOB_FILE_PATH).parent().expect("JOB_FILE_PATH has a folder").display()
            ));
        } else if !claims.iter().any(|c| Path::new(path).starts_with(&c.mount_path)) {
            warnings.push(format!(
                "{key} = {location:?} is a local path, which the pods see only on a volume they mount: mount one with \
                 --pvc CLAIM:PATH or use an object-store URL"
            ));
        }
    }
    let security = &job.security;
    let secret_files = [
        ("security.auth_token_file", &security.auth_token_file),
        ("security.tls_cert", &security.tls_cert),
        ("security.tls_key", &security.tls_key),
        ("security.tls_client_ca", &security.tls_client_ca),
    ];
    for (key, file) in secret_files {
        let Some(file) = file else { continue };
        if !claims.iter().any(|c| Path::new(file).starts_with(&c.mount_path)) {
            warnings.push(format!(
                "{key} = {file:?} is a file the pods see only on a volume they mount: keep it in a Secret and mount that \
                 there with a kustomize patch (for the token, the {AUTH_SECRET} Secret alone will do)"
            ));
        }
    }
    if security.tls_cert.is_some() {
        warnings.push(
            "security.tls_cert is set, so the coordinator serves TLS only: the kubelet's gRPC probes and the \
             ServiceMonitor (scheme http) speak plaintext; patch them before applying"
                .into(),
        );
    }
    if job.checkpoint.url.is_none() {
        warnings.push(
            "checkpoint.url is not set: a restarted coordinator cannot resume the job (it journals under the checkpoint \
             root) and restarted workers start from step 0"
                .into(),
        );
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_JOB: &str = "[job]\nname = \"Clip_Tiny.demo\"\n[data]\ntrain = \"../data/synth/train/manifest.json\"\n\
                           [train]\nglobal_batch = 64\n[cluster]\nmin_workers = 2\nmax_workers = 2\n";
    const GPU_JOB: &str = "[job]\nname = \"vit\"\n[data]\ntrain = \"s3://bucket/laion/manifest.json\"\ndecode_threads = 6\n\
                           [train]\nglobal_batch = 256\n[cluster]\nmin_workers = 8\nmax_workers = 8\nmax_restarts = 5\n\
                           device = \"cuda\"\n[checkpoint]\nurl = \"gs://ckpt/vit\"\ngrace_period_s = 90.5\n";

    fn parse(text: &str) -> JobFile {
        JobFile::parse(text, "test").unwrap()
    }

    fn doc<'a>(rendering: &'a Rendering, file: &str) -> &'a Value {
        &rendering.documents.iter().find(|d| d.file == file).unwrap_or_else(|| panic!("no {file}")).value
    }

    fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
        container["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
    }

    #[test]
    fn objects_are_named_and_labelled_after_the_job() {
        let r = render(&parse(CPU_JOB), &K8sOptions::default()).unwrap();
        let files: Vec<&str> = r.documents.iter().map(|d| d.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "configmap.yaml",
                "coordinator-deployment.yaml",
                "coordinator-service.yaml",
                "coordinator-pdb.yaml",
                "worker-job.yaml",
                "servicemonitor.yaml",
                "kustomization.yaml"
            ]
        );
        assert_eq!(doc(&r, "kustomization.yaml")["resources"].as_array().unwrap().len(), 6);
        let deployment = doc(&r, "coordinator-deployment.yaml");
        assert_eq!(deployment["metadata"]["name"], "clip-tiny-demo-coordinator");
        assert_eq!(deployment["metadata"]["labels"]["app.kubernetes.io/instance"], "clip-tiny-demo");
        assert_eq!(deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], "coordinator");
        assert_eq!(doc(&r, "worker-job.yaml")["metadata"]["name"], "clip-tiny-demo-worker");
        assert_eq!(doc(&r, "configmap.yaml")["metadata"]["name"], "clip-tiny-demo-job");
        assert!(deployment["metadata"].get("namespace").is_none());
        let selector = &doc(&r, "coordinator-service.yaml")["spec"]["selector"];
        assert_eq!(selector, &deployment["spec"]["template"]["metadata"]["labels"]);
        assert_eq!(&doc(&r, "servicemonitor.yaml")["spec"]["selector"]["matchLabels"], selector);
        assert_eq!(&doc(&r, "coordinator-pdb.yaml")["spec"]["selector"]["matchLabels"], selector);
    }

    #[test]
    fn the_config_map_holds_the_job_as_written() {
        let r = render(&parse(CPU_JOB), &K8sOptions::default()).unwrap();
        let text = doc(&r, "configmap.yaml")["data"]["job.toml"].as_str().unwrap();
        assert_eq!(text, CPU_JOB);
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        let annotations = &doc(&r, "coordinator-deployment.yaml")["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[JOB_HASH_ANNOTATION], json!(hash));
    }

    #[test]
    fn coordinator_runs_the_job_file_with_grpc_probes() {
        let r = render(&parse(CPU_JOB), &K8sOptions { namespace: Some("ml".into()), ..K8sOptions::default() }).unwrap();
        let deployment = doc(&r, "coordinator-deployment.yaml");
        assert_eq!(deployment["metadata"]["namespace"], "ml");
        assert_eq!(deployment["spec"]["replicas"], 1);
        let c = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], default_image("braid-coordinator"));
        assert_eq!(c["command"], json!(["braid-coordinator"]));
        assert_eq!(c["args"], json!(["--job", "/etc/braid/job.toml", "--listen", "0.0.0.0:7070"]));
        assert_eq!(c["ports"][0], json!({"name": "grpc", "containerPort": 7070, "protocol": "TCP"}));
        assert_eq!(c["readinessProbe"]["grpc"], json!({"port": 7070, "service": "braid.v1.Coordinator"}));
        assert_eq!(c["livenessProbe"]["grpc"], json!({"port": 7070}));
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/etc/braid");
        assert_eq!(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 150);
        assert_eq!(doc(&r, "coordinator-pdb.yaml")["spec"]["maxUnavailable"], 0);
        let port = &doc(&r, "coordinator-service.yaml")["spec"]["ports"][0];
        assert_eq!(port, &json!({"name": "grpc", "port": 7070, "targetPort": "grpc", "protocol": "TCP"}));
        let endpoint = &doc(&r, "servicemonitor.yaml")["spec"]["endpoints"][0];
        assert_eq!((&endpoint["port"], &endpoint["path"]), (&json!("grpc"), &json!("/metrics")));
    }

    #[test]
    fn cpu_workers_are_one_pod_each_without_gpus() {
        let r = render(&parse(CPU_JOB), &K8sOptions::default()).unwrap();
        let job = doc(&r, "worker-job.yaml");
        assert_eq!(job["spec"]["completionMode"], "Indexed");
        assert_eq!((&job["spec"]["completions"], &job["spec"]["parallelism"]), (&json!(2), &json!(2)));
        assert_eq!(job["spec"]["backoffLimit"], 3);
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "OnFailure");
        let c = &pod["containers"][0];
        assert_eq!(c["command"], json!(["braid", "worker", "--connect-timeout", "600"]));
        assert!(c["resources"]["limits"].get("nvidia.com/gpu").is_none(), "{c}");
        assert_eq!(env(c, "BRAID_COORDINATOR").unwrap()["value"], "clip-tiny-demo-coordinator:7070");
        assert_eq!(env(c, "BRAID_ADVERTISE_HOST").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    }

    #[test]
    fn gpu_workers_request_their_gpus() {
        let one = render(&parse(GPU_JOB), &K8sOptions::default()).unwrap();
        let job = doc(&one, "worker-job.yaml");
        assert_eq!((&job["spec"]["completions"], &job["spec"]["backoffLimit"]), (&json!(8), &json!(5)));
        let pod = &job["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["command"], json!(["braid", "worker", "--device", "cuda:0", "--connect-timeout", "600"]));
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert_eq!(c["resources"]["requests"]["nvidia.com/gpu"], "1");
        assert_eq!(c["resources"]["requests"]["cpu"], "7");
        assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(pod["terminationGracePeriodSeconds"], 121);

        let four = render(&parse(GPU_JOB), &K8sOptions { gpus_per_worker: 4, ..K8sOptions::default() }).unwrap();
        let job = doc(&four, "worker-job.yaml");
        assert_eq!((&job["spec"]["completions"], &job["spec"]["parallelism"]), (&json!(2), &json!(2)));
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        let command = c["command"].as_array().unwrap();
        assert_eq!(command[0..2], [json!("bash"), json!("-c")]);
        assert_eq!(command[4..], [json!("--connect-timeout"), json!("600")]);
        assert_eq!(env(c, "BRAID_GPUS_PER_POD").unwrap()["value"], "4");
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "4");
        assert_eq!(c["resources"]["limits"]["memory"], "64Gi");
    }

    #[test]
    fn secrets_are_referenced_by_backend_never_written() {
        let r = render(&parse(GPU_JOB), &K8sOptions::default()).unwrap();
        for file in ["coordinator-deployment.yaml", "worker-job.yaml"] {
            let c = &doc(&r, file)["spec"]["template"]["spec"]["containers"][0];
            let token = env(c, "BRAID_AUTH_TOKEN").unwrap();
            assert_eq!(token["valueFrom"]["secretKeyRef"], json!({"name": "braid-auth", "key": "token", "optional": true}));
            for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "GOOGLE_SERVICE_ACCOUNT_KEY"] {
                let reference = &env(c, var).unwrap_or_else(|| panic!("{file}: no {var}"))["valueFrom"]["secretKeyRef"];
                assert_eq!(reference, &json!({"name": "braid-object-store", "key": var, "optional": true}));
            }
            assert!(env(c, "AZURE_STORAGE_ACCOUNT_KEY").is_none(), "{file}: Azure credentials for a job without az://");
        }
        let cpu = render(&parse(CPU_JOB), &K8sOptions::default()).unwrap();
        let c = &doc(&cpu, "worker-job.yaml")["spec"]["template"]["spec"]["containers"][0];
        assert!(env(c, "AWS_SECRET_ACCESS_KEY").is_some());
        assert!(env(c, "AWS_SESSION_TOKEN").is_none() && env(c, "GOOGLE_SERVICE_ACCOUNT_KEY").is_none());
    }

    #[test]
    fn options_that_cannot_fit_the_job_are_refused() {
        let gpu = parse(GPU_JOB);
        let err = |job: &JobFile, options: K8sOptions| render(job, &options).unwrap_err().to_string();
        let e = err(&gpu, K8sOptions { gpus_per_worker: 3, ..K8sOptions::default() });
        assert!(e.contains("--gpus-per-worker = 3") && e.contains("8 workers"), "{e}");
        let e = err(&parse(CPU_JOB), K8sOptions { gpus_per_worker: 2, ..K8sOptions::default() });
        assert!(e.contains("cluster.device = \"cpu\""), "{e}");
        let e = err(&gpu, K8sOptions { workers: Some(512), ..K8sOptions::default() });
        assert!(e.contains("with --workers 512") && e.contains("global_batch"), "{e}");
        let e = err(&gpu, K8sOptions { namespace: Some("ML_team".into()), ..K8sOptions::default() });
        assert!(e.contains("--namespace \"ML_team\""), "{e}");
        let mut nameless = gpu.clone();
        nameless.config.job.name = "_.".into();
        assert!(err(&nameless, K8sOptions::default()).contains("job.name \"_.\""));
    }

    #[test]
    fn workers_option_sets_the_generation_size_in_the_job_file() {
        let r = render(&parse(GPU_JOB), &K8sOptions { workers: Some(16), gpus_per_worker: 8, ..K8sOptions::default() }).unwrap();
        assert_eq!(doc(&r, "worker-job.yaml")["spec"]["completions"], 2);
        let text = doc(&r, "configmap.yaml")["data"]["job.toml"].as_str().unwrap();
        let job = JobConfig::parse(text, "configmap").unwrap();
        assert_eq!((job.cluster.min_workers, job.cluster.max_workers), (16, 16));
        let mut expected = parse(GPU_JOB).config;
        (expected.cluster.min_workers, expected.cluster.max_workers) = (16, 16);
        assert_eq!(job, expected, "--workers changed more than the generation size");
    }

    #[test]
    fn local_paths_outside_mounted_claims_are_warned_about() {
        let relative = render(&parse(CPU_JOB), &K8sOptions::default()).unwrap();
        assert!(relative.warnings.iter().any(|w| w.starts_with("data.train = \"../data") && w.contains("relative")));
        assert!(relative.warnings.iter().any(|w| w.starts_with("checkpoint.url is not set")));

        let text = GPU_JOB.replace("s3://bucket/laion", "/data/laion").replace("gs://ckpt/vit", "file:///ckpt/vit");
        let options = K8sOptions { volume_claims: vec!["braid-data:/data".parse().unwrap()], ..K8sOptions::default() };
        let r = render(&parse(&text), &options).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].starts_with("checkpoint.url = \"file:///ckpt/vit\" is a local path"), "{:?}", r.warnings);
        let pod = &doc(&r, "worker-job.yaml")["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0], json!({"name": "claim-0", "persistentVolumeClaim": {"claimName": "braid-data"}}));
        assert_eq!(pod["containers"][0]["volumeMounts"][0], json!({"name": "claim-0", "mountPath": "/data"}));
    }

    #[test]
    fn tls_and_secret_files_are_warned_about() {
        let text = format!("{GPU_JOB}[security]\ntls_cert = \"/certs/tls.crt\"\ntls_key = \"/certs/tls.key\"\n");
        let r = render(&parse(&text), &K8sOptions::default()).unwrap();
        assert!(r.warnings.iter().any(|w| w.starts_with("security.tls_key = \"/certs/tls.key\" is a file")), "{:?}", r.warnings);
        assert!(r.warnings.iter().any(|w| w.contains("probes")), "{:?}", r.warnings);
    }

    #[test]
    fn volume_claims_parse_claim_and_absolute_path() {
        let claim: VolumeClaim = "braid-data:/data/".parse().unwrap();
        assert_eq!(claim, VolumeClaim { claim: "braid-data".into(), mount_path: "/data".into() });
        for bad in ["braid-data", "Braid:/data", "braid:data", "braid:/"] {
            let e = bad.parse::<VolumeClaim>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--pvc = {bad}:")), "{e}");
        }
    }

    #[test]
    fn the_stream_leaves_out_the_kustomization() {
        let r = render(&parse(CPU_JOB), &K8sOptions { service_monitor: false, ..K8sOptions::default() }).unwrap();
        let stream = r.stream();
        assert_eq!(stream.matches("\n---\n").count() + 1, 5, "{stream}");
        assert!(stream.starts_with("---\n# configmap.yaml\n# Rendered by `braid deploy k8s`"));
        assert!(!stream.contains("Kustomization") && !stream.contains("ServiceMonitor"));
    }
}
