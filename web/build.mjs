// Builds the browser client into CTSAM3DLib/server/web_client/, where `ctsam3d serve` finds it:
// app.js (src/main.js and its dependencies, one minified ES module), app.css and index.html.
import { copyFile, mkdir } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'

const here = (path) => fileURLToPath(new URL(path, import.meta.url))
const output = here('../CTSAM3DLib/server/web_client/')

await mkdir(output, { recursive: true })
await esbuild.build({
  entryPoints: [here('src/main.js')],
  outfile: `${output}app.js`,
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  legalComments: 'eof',
  logLevel: 'warning',
})
await copyFile(here('style.css'), `${output}app.css`)
await copyFile(here('index.html'), `${output}index.html`)
console.log(`built the web client into ${output}`)
