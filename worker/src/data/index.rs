//! `braid data index`: read the headers of WebDataset tar shards and record the byte range of
//! every member of every sample in a [`DatasetManifest`].
//!
//! Members are grouped into samples by the WebDataset rule: the key is the member's path up to
//! the first dot of its file name, the extension is the rest, and consecutive members with the
//! same key form one sample. Members without a dot in their file name are ignored.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use braid_coordinator::manifest::{DatasetManifest, SampleEntry, ShardEntry, MANIFEST_VERSION};
use rayon::prelude::*;

use super::error::{Error, Result};

/// The file name of the manifest written next to the shards.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Splits a member path into the WebDataset (key, extension), or `None` when its file name has
/// no dot.
pub fn split_member(path: &str) -> Option<(&str, &str)> {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[name_start..].find('.')? + name_start;
    let (key, ext) = (&path[..dot], &path[dot + 1..]);
    (!key.ends_with('/') && !key.is_empty() && !ext.is_empty()).then_some((key, ext))
}

/// Indexes one tar shard read from `reader`; `url` is recorded in the entry and `origin` names
/// the shard in errors.
pub fn index_reader<R: Read + Seek>(mut reader: R, url: &str, origin: &str) -> Result<ShardEntry> {
    let tar_error = |reason: String| Error::Tar { path: origin.to_string(), reason };
    let size = reader.seek(SeekFrom::End(0)).map_err(|e| tar_error(e.to_string()))?;
    reader.rewind().map_err(|e| tar_error(e.to_string()))?;
    let mut archive = tar::Archive::new(reader);
    let mut samples: Vec<SampleEntry> = Vec::new();
    for entry in archive.entries_with_seek().map_err(|e| tar_error(e.to_string()))? {
        let entry = entry.map_err(|e| tar_error(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| tar_error(e.to_string()))?.to_string_lossy().into_owned();
        let (offset, length) = (entry.raw_file_position(), entry.size());
        if offset + length > size {
            return Err(tar_error(format!("member {path} ends at byte {} past the end ({size})", offset + length)));
        }
        let Some((key, ext)) = split_member(&path) else { continue };
        add_member(&mut samples, key, ext, (offset, length));
    }
    Ok(ShardEntry { url: url.to_string(), size, samples })
}

fn add_member(samples: &mut Vec<SampleEntry>, key: &str, ext: &str, range: (u64, u64)) {
    match samples.last_mut() {
        Some(last) if last.key == key => {
            last.members.insert(ext.to_string(), range);
        }
        _ => samples.push(SampleEntry { key: key.to_string(), members: BTreeMap::from([(ext.to_string(), range)]) }),
    }
}

/// Indexes the tar file at `path`, recording it under `url`.
pub fn index_shard(path: &Path, url: &str) -> Result<ShardEntry> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    index_reader(BufReader::new(file), url, &path.display().to_string())
}

/// Every `.tar` file under `dir` (recursively), as paths relative to `dir`, sorted.
fn find_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let folder = dir.join(&relative);
        for entry in std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))? {
            let entry = entry.map_err(|e| Error::io(&folder, e))?;
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let child = relative.join(entry.file_name());
            if kind.is_dir() {
                pending.push(child);
            } else if child.extension().is_some_and(|e| e == "tar") {
                found.push(child);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Indexes every `.tar` shard under `dir`; shard URLs are relative to `dir` (where
/// [`write_manifest`] puts the manifest).
pub fn index_dir(dir: &Path) -> Result<DatasetManifest> {
    let shards = find_shards(dir)?;
    if shards.is_empty() {
        return Err(Error::Tar { path: dir.display().to_string(), reason: "no .tar shards in this folder".into() });
    }
    let shards = shards
        .par_iter()
        .map(|relative| {
            let url: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            index_shard(&dir.join(relative), &url.join("/"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DatasetManifest { version: MANIFEST_VERSION, shards })
}

/// Writes `manifest` to `dir/manifest.json` (through a temporary file, so readers never see a
/// partial one) and returns its path.
pub fn write_manifest(dir: &Path, manifest: &DatasetManifest) -> Result<PathBuf> {
    let path = dir.join(MANIFEST_FILE);
    let temporary = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    std::fs::write(&temporary, manifest.to_json()).map_err(|e| Error::io(&temporary, e))?;
    std::fs::rename(&temporary, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn keys_follow_the_webdataset_rule() {
        assert_eq!(split_member("000001.jpg"), Some(("000001", "jpg")));
        assert_eq!(split_member("a/b.c/000001.seg.png"), Some(("a/b.c/000001", "seg.png")));
        assert_eq!(split_member("README"), None);
        assert_eq!(split_member("dir/.hidden"), None);
    }

    #[test]
    fn members_are_grouped_and_ranges_point_at_their_bytes() {
        let long = format!("{}/x.txt", "d".repeat(150));
        let members: Vec<(&str, &[u8])> = vec![
            ("a.png", b"png-a"),
            ("a.txt", b"caption a"),
            ("b.png", b"png-b"),
            ("b.cls", b"3"),
            (long.as_str(), b"long name"),
        ];
        let bytes = tar_of(&members);
        let shard = index_reader(Cursor::new(&bytes), "s.tar", "s.tar").unwrap();
        assert_eq!(shard.size, bytes.len() as u64);
        let keys: Vec<&str> = shard.samples.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", &long[..long.len() - 4]]);
        let read = |key: usize, ext: &str| {
            let (o, l) = shard.samples[key].members[ext];
            &bytes[o as usize..(o + l) as usize]
        };
        assert_eq!(read(0, "png"), b"png-a");
        assert_eq!(read(0, "txt"), b"caption a");
        assert_eq!(read(1, "cls"), b"3");
        assert_eq!(read(2, "txt"), b"long name");
    }

    #[test]
    fn a_truncated_tar_is_an_error_naming_the_shard() {
        let bytes = tar_of(&[("a.txt", &[7u8; 3000])]);
        let err = index_reader(Cursor::new(&bytes[..1500]), "s.tar", "/d/s.tar").unwrap_err().to_string();
        assert!(err.contains("/d/s.tar"), "{err}");
    }

    #[test]
    fn index_dir_finds_shards_and_writes_relative_urls() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("part")).unwrap();
        std::fs::write(dir.path().join("part/s1.tar"), tar_of(&[("k.txt", b"x")])).unwrap();
        std::fs::write(dir.path().join("s0.tar"), tar_of(&[("j.txt", b"y")])).unwrap();
        let manifest = index_dir(dir.path()).unwrap();
        let urls: Vec<&str> = manifest.shards.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(urls, ["part/s1.tar", "s0.tar"]);
        let path = write_manifest(dir.path(), &manifest).unwrap();
        let back = DatasetManifest::from_json(&std::fs::read(path).unwrap(), "m").unwrap();
        assert_eq!(back, manifest);
    }
}
