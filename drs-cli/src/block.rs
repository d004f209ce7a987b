//! `drs-cli block write|read`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use futures::stream::{self, StreamExt};

/// Blocks moved per client call when streaming.
const CHUNK_BLOCKS: u64 = 256;

pub async fn write(cluster: &Path, lba: u64, input: Option<&Path>) -> anyhow::Result<()> {
    let client = crate::client(cluster).await?;
    let bs = client.block_size();
    if lba >= client.blocks() {
        anyhow::bail!(
            "block {lba} is out of range (the volume has {} blocks)",
            client.blocks()
        );
    }
    let mut reader: Box<dyn Read> = match input {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let need = len.div_ceil(bs as u64);
            if need > 0
                && lba
                    .checked_add(need)
                    .is_none_or(|end| end > client.blocks())
            {
                anyhow::bail!(
                    "{} holds {need} blocks of data; from block {lba} they do not fit a volume of {} blocks",
                    p.display(),
                    client.blocks()
                );
            }
            Box::new(f)
        }
        None => Box::new(std::io::stdin().lock()),
    };
    let written = copy_in(&client, lba, reader.as_mut()).await;
    // Unlocks a slow node did not take yet are retried in the background; give them
    // a moment so no lock outlives this command, whether the writes worked or not.
    client
        .settle_unlocks(std::time::Duration::from_secs(5))
        .await;
    let (total, last) = written?;
    if total == 0 {
        anyhow::bail!("no input data: nothing written");
    }
    eprintln!("wrote {total} bytes to blocks {lba}..{last}");
    Ok(())
}

/// Writes everything `reader` holds from block `lba` on; returns (bytes, last block).
async fn copy_in(
    client: &drs_client::Client,
    lba: u64,
    reader: &mut dyn Read,
) -> anyhow::Result<(u64, u64)> {
    let bs = client.block_size();
    let chunk = CHUNK_BLOCKS as usize * bs;
    let mut buf = vec![0u8; chunk];
    let mut at = lba;
    let mut total = 0u64;
    loop {
        let n = read_full(reader, &mut buf).context("read input")?;
        if n == 0 {
            break;
        }
        let need = n.div_ceil(bs) as u64;
        if at.checked_add(need).is_none_or(|end| end > client.blocks()) {
            anyhow::bail!(
                "the data from block {lba} on needs blocks up to {} at least, the volume has {} blocks; {total} bytes were written before",
                at.saturating_add(need - 1),
                client.blocks()
            );
        }
        client.write_blocks(at, &buf[..n]).await?;
        at += need;
        total += n as u64;
        if n < chunk {
            break;
        }
    }
    Ok((total, at.saturating_sub(1)))
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(x) => n += x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub async fn read(
    cluster: &Path,
    lba: u64,
    count: u64,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let client = crate::client(cluster).await?;
    if count == 0 {
        return Ok(());
    }
    if lba
        .checked_add(count)
        .is_none_or(|end| end > client.blocks())
    {
        anyhow::bail!(
            "{} out of range (the volume has {} blocks)",
            span(lba, count),
            client.blocks()
        );
    }
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let chunks = (lba..lba + count)
        .step_by(CHUNK_BLOCKS as usize)
        .map(|start| (start, CHUNK_BLOCKS.min(lba + count - start)));
    let mut results = stream::iter(chunks)
        .map(|(s, n)| client.read_blocks(s, n))
        .buffered(2);
    while let Some(blocks) = results.next().await {
        for b in blocks? {
            if let Err(e) = out.write_all(&b) {
                return closed_pipe_is_fine(e);
            }
        }
    }
    if let Err(e) = out.flush() {
        return closed_pipe_is_fine(e);
    }
    Ok(())
}

/// A reader that stopped reading (`drs-cli block read ... | head -c 10`) is not an
/// error; anything else is.
fn closed_pipe_is_fine(e: std::io::Error) -> anyhow::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(anyhow::Error::new(e).context("write output"))
    }
}

/// "block 7" or "blocks 7..9".
fn span(lba: u64, count: u64) -> String {
    if count <= 1 {
        format!("block {lba} is")
    } else {
        format!("blocks {lba}..{} are", lba.saturating_add(count - 1))
    }
}
