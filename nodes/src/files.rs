//! Files named by workflow inputs: resolving a name inside its folder (never outside it)
//! and listing a folder's files for combo choices.

use std::path::{Component, Path, PathBuf};

use sakuga_models::store::{ModelFolder, ModelStore};

use crate::error::NodeError;
use crate::node::NodeEnv;
use crate::schema::ComboOptions;

/// Image files LoadImage offers.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// Resolves `name` (may contain `/` subfolders) inside `root`; rejects absolute paths, `..`
/// and symlinks that lead out of `root`.
///
/// # Errors
/// [`NodeError::PathEscapes`] for names that leave `root`.
pub fn resolve_inside(root: &Path, name: &str) -> Result<PathBuf, NodeError> {
    let escapes = || NodeError::PathEscapes {
        name: name.to_string(),
        root: root.to_path_buf(),
    };
    let relative = Path::new(name);
    if name.is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(escapes());
    }
    let joined = root.join(relative);
    // A symlink may point anywhere, and a write creates what is missing under the nearest
    // existing ancestor: that ancestor, links resolved, must be inside the root. The root
    // itself may be a link (a mounted volume); only links under it are judged.
    let Ok(real_root) = root.canonicalize() else {
        return Ok(joined);
    };
    for existing in joined.ancestors() {
        if existing.symlink_metadata().is_err() {
            continue;
        }
        // A dangling link resolves to nothing, and writing through it creates its target.
        let real = existing.canonicalize().map_err(|_| escapes())?;
        if !real.starts_with(&real_root) {
            return Err(escapes());
        }
        break;
    }
    Ok(joined)
}

/// Empties `dir` (ComfyUI clears its temp dir at start): previews are for viewing, and
/// keeping them makes the folder grow without end. Links inside are removed, never followed.
///
/// # Errors
/// [`NodeError::Io`] when the dir cannot be removed or made again.
pub fn clear_dir(dir: &Path) -> Result<(), NodeError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NodeError::Io {
                op: "clear",
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })
}

/// The choices of a combo input, sorted; file lists are relative names with `/`.
pub fn list_options(env: &NodeEnv, options: &ComboOptions) -> Vec<String> {
    match options {
        ComboOptions::Static(list) => list.iter().map(|s| (*s).to_string()).collect(),
        ComboOptions::InputFiles => list_files(&env.input_dir, IMAGE_EXTENSIONS),
        ComboOptions::InputVideos => list_files(&env.input_dir, crate::video::VIDEO_EXTENSIONS),
        // The model store's listing: its one extension table and its one path check.
        ComboOptions::ModelFolder(folder) => ModelFolder::from_dir_name(folder)
            .map(|folder| ModelStore::new(&env.models_dir).list(folder))
            .unwrap_or_default(),
    }
}

/// Files under `root` (recursively, without following symlinked folders) with one of
/// `extensions`, as sorted relative names.
pub fn list_files(root: &Path, extensions: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                pending.push(path);
                continue;
            }
            let wanted = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)));
            if wanted && let Ok(rel) = path.strip_prefix(root) {
                let parts: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect();
                found.push(parts.join("/"));
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_that_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x.png", "/etc/passwd", "a/../../x", "", "./x/../../y"] {
            assert!(
                matches!(
                    resolve_inside(dir.path(), bad),
                    Err(NodeError::PathEscapes { .. })
                ),
                "{bad} accepted"
            );
        }
        assert_eq!(
            resolve_inside(dir.path(), "sub/x.png").unwrap(),
            dir.path().join("sub/x.png")
        );
    }

    #[cfg(unix)]
    #[test]
    fn rejects_symlinks_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.png"), b"x").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.png"),
            root.path().join("link.png"),
        )
        .unwrap();
        assert!(matches!(
            resolve_inside(root.path(), "link.png"),
            Err(NodeError::PathEscapes { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn refuses_new_files_under_a_linked_folder_that_leaves_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("shots")).unwrap();
        for name in ["shots/x.png", "shots/deeper/still/x.png"] {
            assert!(
                matches!(
                    resolve_inside(root.path(), name),
                    Err(NodeError::PathEscapes { .. })
                ),
                "{name} accepted"
            );
        }
        std::os::unix::fs::symlink(
            outside.path().join("not-there"),
            root.path().join("dangling.png"),
        )
        .unwrap();
        assert!(matches!(
            resolve_inside(root.path(), "dangling.png"),
            Err(NodeError::PathEscapes { .. })
        ));
        // A link that stays inside is fine.
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink(root.path().join("real"), root.path().join("alias")).unwrap();
        assert!(resolve_inside(root.path(), "alias/new/x.png").is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn clearing_removes_links_without_following_them() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep.png"), b"x").unwrap();
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("temp");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/old.png"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).unwrap();
        clear_dir(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert!(outside.path().join("keep.png").exists());
    }

    #[test]
    fn lists_matching_files_sorted_with_subfolders() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        for name in ["b.png", "a.JPG", "notes.txt", "sub/c.webp"] {
            std::fs::write(root.path().join(name), b"x").unwrap();
        }
        assert_eq!(
            list_files(root.path(), IMAGE_EXTENSIONS),
            vec!["a.JPG", "b.png", "sub/c.webp"]
        );
    }
}
