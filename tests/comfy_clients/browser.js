// Loads the ComfyUI frontend served by sakuga in Debian's chromium (driven by
// playwright-core, never a downloaded browser), loads an API-format workflow on the demo
// checkpoint, queues it from the UI and waits for the output image to appear on its Save
// Image node. Usage: node browser.js NODE_PREFIX URL WORKFLOW SCREENSHOT; prints a summary.
const [prefix, url, workflowPath, screenshot] = process.argv.slice(2);
const { chromium } = require(`${prefix}/node_modules/playwright-core`);
const fs = require('fs');

(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const apiErrors = [];
  page.on('response', (r) => {
    if (r.status() >= 500 && r.url().startsWith(url)) apiErrors.push(`${r.status()} ${r.url()}`);
  });
  // A first visit opens the templates dialog; a returning user does not see it.
  await fetch(`${url}api/settings`, {
    method: 'POST',
    body: JSON.stringify({ 'Comfy.TutorialCompleted': true }),
  });
  await page.goto(url, { waitUntil: 'load', timeout: 90000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 90000 });
  const workflow = JSON.parse(fs.readFileSync(workflowPath, 'utf8'));
  // A fresh seed: the UI attributes a job's outputs to its tab once the POST /prompt
  // answer is in, and a fully cached run can finish before that.
  for (const node of Object.values(workflow)) {
    if (node.class_type === 'KSampler') node.inputs.seed = Date.now() % 1000000007;
  }
  await page.evaluate(async (wf) => { await window.app.loadApiJson(wf, 'workflow.json'); }, workflow);
  const nodes = await page.evaluate(() => window.app.graph._nodes.length);
  const viewed = page.waitForResponse((r) => r.url().includes('/view?') && r.status() === 200, { timeout: 180000 });
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  const view = await viewed;
  // The output is shown: an image element loaded from /view, and the node's outputs.
  await page.waitForFunction(() => [...document.querySelectorAll('img')]
    .some((i) => i.src.includes('/view?') && i.complete && i.naturalWidth > 0), null, { timeout: 60000 });
  const shown = await page.evaluate(() => {
    const img = [...document.querySelectorAll('img')].find((i) => i.src.includes('/view?') && i.naturalWidth > 0);
    const outputs = window.app.nodeOutputs || {};
    return { src: img.src, width: img.naturalWidth, height: img.naturalHeight, output_nodes: Object.keys(outputs) };
  });
  await page.evaluate(async () => {
    try { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) { /* older UIs */ }
  });
  await page.waitForTimeout(500);
  await page.keyboard.press('Escape');
  await page.screenshot({ path: screenshot });
  await browser.close();
  console.log(JSON.stringify({
    nodes, view: view.url(), content_type: view.headers()['content-type'], shown, api_errors: apiErrors,
  }));
})().catch((e) => { console.error('browser test failed:', e); process.exit(1); });
