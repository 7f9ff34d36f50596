// Builds the browser client into CTSAM3DLib/server/web_client/, where `ctsam3d serve` finds it:
// app.js (src/main.js and its dependencies, one minified ES module), worker.jpeg.js and dcm2niix.jpeg.wasm
// (the DICOM converter), app.css and index.html.
import { copyFile, mkdir } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'

const here = (path) => fileURLToPath(new URL(path, import.meta.url))
const output = here('../CTSAM3DLib/server/web_client/')
const dcm2niix = here('node_modules/@niivue/dcm2niix/dist/')

/** One minified ES module of `entry` and everything it imports. */
const bundle = (entry, name, options = {}) => esbuild.build({
  entryPoints: [entry],
  outfile: `${output}${name}`,
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  legalComments: 'eof',
  logLevel: 'warning',
  ...options,
})

await mkdir(output, { recursive: true })
await bundle(here('src/main.js'), 'app.js')
// DICOM series are converted in the browser by dcm2niix (WebAssembly) in a worker; its loader asks for
// ./worker.jpeg.js beside app.js, and the worker for dcm2niix.jpeg.wasm beside itself (the build that also
// reads JPEG-LS and JPEG 2000 compressed DICOM, common in clinical archives). Emscripten's loader imports
// Node's built-ins only when it runs under Node, never in a browser.
await bundle(`${dcm2niix}worker.jpeg.js`, 'worker.jpeg.js', { external: ['module', 'fs', 'path', 'url', 'worker_threads'] })
await copyFile(`${dcm2niix}dcm2niix.jpeg.wasm`, `${output}dcm2niix.jpeg.wasm`)
await copyFile(here('style.css'), `${output}app.css`)
await copyFile(here('index.html'), `${output}index.html`)
console.log(`built the web client into ${output}`)
