//! What /proc says about the broker (CPU time, resident memory) and about the generator's
//! own file-descriptor limit.
//!
//! Why /proc and not a metrics endpoint: the same reading must work for certmq and for
//! Mosquitto, and neither broker's own accounting is trusted to measure itself. Linux
//! reports utime and stime in USER_HZ ticks, which is 100 on every architecture Linux
//! exports to user space, so one tick is 10 ms: CPU figures are only meaningful over
//! runs that cost the broker at least about a second.

use super::LoadError;

/// USER_HZ: /proc/PID/stat time unit per second.
const TICKS_PER_SECOND: f64 = 100.0;

/// A process's user + system CPU time, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSeconds(pub f64);

/// `utime + stime` of `pid`.
pub fn cpu_seconds(pid: u32) -> Result<CpuSeconds, LoadError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields from
    // the last ')'. After it, field 3 (state) is index 0, so utime (14) and stime (15) are
    // indices 11 and 12.
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or(LoadError::ProcFormat {
            path: path.clone(),
            field: "comm",
        })?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |index: usize, name: &'static str| -> Result<f64, LoadError> {
        fields
            .get(index)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|ticks| ticks as f64 / TICKS_PER_SECOND)
            .ok_or(LoadError::ProcFormat {
                path: path.clone(),
                field: name,
            })
    };
    Ok(CpuSeconds(field(11, "utime")? + field(12, "stime")?))
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, LoadError> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(LoadError::ProcFormat {
            path,
            field: "VmRSS",
        })
}

/// The kernel's own memory for sockets, machine-wide: `Slab` of /proc/meminfo (socket,
/// inode, file and epoll objects live in slab caches) and the pages TCP buffers hold
/// (`mem` of the TCP line of /proc/net/sockstat). Neither is in a broker's RSS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelMem {
    pub slab_kib: u64,
    pub tcp_pages: u64,
}

/// Reads [`KernelMem`] now. Machine-wide: other processes' activity shows in it too.
pub fn kernel_mem() -> Result<KernelMem, LoadError> {
    let meminfo = "/proc/meminfo".to_owned();
    let text = read(&meminfo)?;
    let slab_kib = text
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(LoadError::ProcFormat {
            path: meminfo,
            field: "Slab",
        })?;
    let sockstat = "/proc/net/sockstat".to_owned();
    let text = read(&sockstat)?;
    let tcp_pages = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields
                .windows(2)
                .find(|w| w[0] == "mem")
                .and_then(|w| w[1].parse().ok())
        })
        .ok_or(LoadError::ProcFormat {
            path: sockstat,
            field: "TCP mem",
        })?;
    Ok(KernelMem {
        slab_kib,
        tcp_pages,
    })
}

/// This process's soft RLIMIT_NOFILE ("Max open files"); `u64::MAX` when unlimited.
pub fn open_files_limit() -> Result<u64, LoadError> {
    let path = "/proc/self/limits".to_owned();
    let text = read(&path)?;
    let soft = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or(LoadError::ProcFormat {
            path: path.clone(),
            field: "Max open files",
        })?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse().map_err(|source| LoadError::ProcNumber {
        path,
        field: "Max open files",
        source,
    })
}

fn read(path: &str) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Proc {
        path: path.to_owned(),
        source,
    })
}
