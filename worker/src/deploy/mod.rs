//! Deployment manifests rendered from a job file (`braid deploy k8s`): pure functions from a
//! job file ([`k8s::JobFile`]: its text and its [`JobConfig`](braid_coordinator::config::JobConfig))
//! and options to named documents, and the one place that writes them to a folder without
//! losing what is already there.

pub mod k8s;
pub mod yaml;

use std::path::{Path, PathBuf};

/// One file of a rendering: its file name and its content as a JSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// File name inside the output folder, e.g. `coordinator-deployment.yaml`.
    pub file: String,
    /// The object, as the YAML file holds it.
    pub value: serde_json::Value,
}

impl Document {
    /// The file's text: a comment naming where it came from, then the YAML.
    pub fn to_yaml(&self, job_name: &str) -> String {
        format!(
            "# Rendered by `braid deploy k8s` for job {job_name:?}: render again rather than edit.\n{}",
            yaml::to_string(&self.value)
        )
    }
}

/// What went wrong while rendering or writing manifests.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The job file, with the options applied, is not a valid job.
    #[error(transparent)]
    Config(#[from] braid_coordinator::error::Error),
    /// A name cannot become a Kubernetes object name.
    #[error("{what} {name:?} cannot name Kubernetes objects: {reason}")]
    Name {
        /// What the name is (`job.name`, `--pvc claim`).
        what: String,
        /// The name as given.
        name: String,
        /// Why it is unusable.
        reason: String,
    },
    /// An option's value is unusable for this job.
    #[error("{option} = {value}: {reason}")]
    Option {
        /// The option, as on the command line.
        option: String,
        /// Its value.
        value: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Files in the output folder differ from the rendering and `--force` was not given.
    #[error(
        "refusing to overwrite {} in {} that differ from this rendering: {} (pass --force to replace them)",
        if files.len() == 1 { "a file".to_string() } else { format!("{} files", files.len()) },
        dir.display(),
        files.join(", ")
    )]
    WouldOverwrite {
        /// The output folder.
        dir: PathBuf,
        /// The files that differ.
        files: Vec<String>,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`writing`, `reading`, `creating folder`).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// `name` as a DNS-1123 label (lowercase letters, digits and `-`, starting and ending with a
/// letter or digit) of at most `max_len` characters: other characters become `-`, runs of `-`
/// shrink to one, and the name is cut to length. `what` names the source in the error when
/// nothing usable is left.
pub fn dns_label(what: &str, name: &str, max_len: usize) -> Result<String, DeployError> {
    let mut label = String::with_capacity(name.len());
    for c in name.chars().map(|c| c.to_ascii_lowercase()) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if !(c == '-' && (label.is_empty() || label.ends_with('-'))) {
            label.push(c);
        }
    }
    label.truncate(max_len);
    let label = label.trim_end_matches('-').to_string();
    if label.is_empty() {
        return Err(DeployError::Name {
            what: what.to_string(),
            name: name.to_string(),
            reason: "it has no letters or digits, and Kubernetes names need at least one".into(),
        });
    }
    Ok(label)
}

/// What [`write_files`] did.
#[derive(Debug, Default, PartialEq)]
pub struct WriteReport {
    /// Files written (new or replaced).
    pub written: Vec<String>,
    /// Files already there with the same content.
    pub unchanged: Vec<String>,
}

/// Writes `files` (name, text) into `dir`, creating it. Files that exist with other content are
/// only replaced with `force`; without it nothing is written when any would be, and the error
/// names them all. Files in `dir` that are not in `files` are left alone.
pub fn write_files(dir: &Path, files: &[(String, String)], force: bool) -> Result<WriteReport, DeployError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| DeployError::Io { action, path, source }
    };
    let mut report = WriteReport::default();
    let mut differing = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(existing) if existing == text.as_bytes() => report.unchanged.push(name.clone()),
            Ok(_) => differing.push(name.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading", &path)(e)),
        }
    }
    if !differing.is_empty() && !force {
        return Err(DeployError::WouldOverwrite { dir: dir.to_path_buf(), files: differing });
    }
    std::fs::create_dir_all(dir).map_err(io("creating folder", dir))?;
    for (name, text) in files {
        if report.unchanged.contains(name) {
            continue;
        }
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io("writing", &path))?;
        report.written.push(name.clone());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_label_keeps_what_kubernetes_allows() {
        assert_eq!(dns_label("job.name", "clip-vit-b-16", 63).unwrap(), "clip-vit-b-16");
        assert_eq!(dns_label("job.name", "CLIP_ViT.b__16", 63).unwrap(), "clip-vit-b-16");
        assert_eq!(dns_label("job.name", "-_run.7_", 63).unwrap(), "run-7");
        assert_eq!(dns_label("job.name", "abcdef-ghi", 7).unwrap(), "abcdef");
        assert_eq!(dns_label("job.name", &"x".repeat(80), 51).unwrap().len(), 51);
    }

    #[test]
    fn dns_label_names_a_name_with_nothing_left() {
        let err = dns_label("job.name", "_._", 63).unwrap_err().to_string();
        assert!(err.contains("job.name \"_._\""), "{err}");
        assert!(err.contains("no letters or digits"), "{err}");
    }

    #[test]
    fn write_files_refuses_to_overwrite_differing_files_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let files = vec![("a.yaml".to_string(), "a: 1\n".to_string()), ("b.yaml".to_string(), "b: 1\n".to_string())];
        let first = write_files(&out, &files, false).unwrap();
        assert_eq!(first.written, ["a.yaml", "b.yaml"]);
        let again = write_files(&out, &files, false).unwrap();
        assert_eq!(again, WriteReport { written: vec![], unchanged: vec!["a.yaml".into(), "b.yaml".into()] });

        std::fs::write(out.join("b.yaml"), "b: edited\n").unwrap();
        let changed = vec![("a.yaml".to_string(), "a: 2\n".to_string()), files[1].clone()];
        let err = write_files(&out, &changed, false).unwrap_err().to_string();
        assert!(err.contains("a.yaml, b.yaml") && err.contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(out.join("a.yaml")).unwrap(), "a: 1\n", "a refused write changed a file");
        assert_eq!(std::fs::read_to_string(out.join("b.yaml")).unwrap(), "b: edited\n");

        let forced = write_files(&out, &changed, true).unwrap();
        assert_eq!(forced.written, ["a.yaml", "b.yaml"]);
        assert_eq!(std::fs::read_to_string(out.join("b.yaml")).unwrap(), "b: 1\n");
    }
}
