//! Checks of the host files a configuration names, shared by the sections.

use std::path::Path;

use crate::error::ConfigError;

/// `path` must be a readable regular file.
pub(super) fn check_file(field: &str, path: &Path) -> Result<std::fs::File, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    match std::fs::metadata(path) {
        // Opening a regular file has no side effect (and never blocks, unlike a FIFO).
        Ok(m) if m.is_file() => std::fs::File::open(path).map_err(|e| {
            ConfigError::invalid(field, format!("cannot open {}: {e}", path.display()))
        }),
        Ok(m) => Err(ConfigError::invalid(
            field,
            format!(
                "{} is {}, not a regular file",
                path.display(),
                file_kind(&m)
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot access {}: {e}", path.display()),
        )),
    }
}

/// What kind of file `m` describes, for messages.
pub(super) fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The kernel must be an x86_64 ELF (`vmlinux`) or a bzImage: what create's loader takes.
pub(super) fn check_kernel_format(
    field: &str,
    path: &Path,
    mut f: std::fs::File,
) -> Result<(), ConfigError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(0x210);
    (&mut f)
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(|e| ConfigError::invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let elf64_x86 = head.len() >= 20
        && head[..4] == *b"\x7fELF"
        && head[4] == 2
        && u16::from_le_bytes([head[18], head[19]]) == 0x3e;
    let bzimage = head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if elf64_x86 || bzimage {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!(
                "{} is neither an x86_64 ELF vmlinux nor a bzImage",
                path.display()
            ),
        ))
    }
}

/// An identifier the user names something with (`drive_id`, `iface_id`, `kestrel.name`): 1 to
/// `max_len` ASCII letters, digits, `-` and `_`, so it is safe in paths, thread names and logs.
pub(super) fn check_id(field: &str, id: &str, max_len: usize) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > max_len {
        return Err(ConfigError::invalid(
            field,
            format!("must be 1 to {max_len} characters"),
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfigError::invalid(
            field,
            "may hold only ASCII letters, digits, '-' and '_'",
        ));
    }
    Ok(())
}

/// `id` must not be the id of an entry before it in the list `list` (`drives`, `fs`, ...):
/// `earlier` yields the ids of entries `0..i` in order.
pub(super) fn check_unique<'a>(
    field: &str,
    id: &str,
    list: &str,
    earlier: impl IntoIterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    match earlier.into_iter().position(|o| o == id) {
        Some(j) => Err(ConfigError::invalid(
            field,
            format!("{id:?} is already used by {list}[{j}]"),
        )),
        None => Ok(()),
    }
}

/// A path Kestrel will open for writing, creating it when missing (logger and metrics
/// outputs: a regular file, a FIFO or a character device). It must be non-empty; when it
/// exists it must not be a directory; when it does not, its directory must exist. Opens
/// nothing (opening a FIFO could block).
pub(super) fn check_output_path(field: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(ConfigError::invalid(
            field,
            format!("{} is a directory", path.display()),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) if !d.is_dir() => Err(ConfigError::invalid(
                    field,
                    format!("directory {} does not exist", d.display()),
                )),
                _ => Ok(()),
            }
        }
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot access {}: {e}", path.display()),
        )),
    }
}
