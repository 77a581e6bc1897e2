// Drives sakuga's ComfyUI API with @stable-canvas/comfyui-client (npm), a client nobody
// here wrote. Usage: node npm_client.js NODE_PREFIX HOST:PORT EXAMPLES_DIR; prints one
// JSON summary line.
const [prefix, host, examples] = process.argv.slice(2);
const { Client } = require(`${prefix}/node_modules/@stable-canvas/comfyui-client`);
const WebSocket = require(`${prefix}/node_modules/ws`);
const fs = require('fs');

async function run(client, name) {
  const prompt = JSON.parse(fs.readFileSync(`${examples}/${name}.json`, 'utf8'));
  const seen = [];
  const kinds = ['execution_start', 'execution_cached', 'executing', 'progress', 'executed', 'execution_success'];
  const offs = kinds.map((kind) => client.on(kind, (data) => {
    if (data && data.prompt_id !== undefined) seen.push(kind);
  }));
  let progress = 0;
  const out = await client.enqueue(prompt, { progress: () => { progress += 1; } });
  offs.forEach((off) => typeof off === 'function' && off());
  const images = [];
  for (const img of out.images) {
    const bytes = img.type === 'url'
      ? Buffer.from(await (await fetch(img.data)).arrayBuffer())
      : Buffer.from(img.data);
    images.push({ via: img.type, url: img.type === 'url' ? img.data : null, png: bytes.subarray(0, 4).toString('hex') === '89504e47', bytes: bytes.length });
  }
  return { prompt_id: out.prompt_id, images, events: [...new Set(seen)], progress };
}

(async () => {
  const client = new Client({ api_host: host, WebSocket });
  await client.connect();
  const stats = await client.getSystemStats();
  const summary = {
    device: stats.devices[0].type,
    txt2img: await run(client, 'anime_txt2img'),
    comic: await run(client, 'comic_panels_batch'),
  };
  client.close();
  console.log(JSON.stringify(summary));
  process.exit(0);
})().catch((e) => { console.error('client failed:', e); process.exit(1); });
