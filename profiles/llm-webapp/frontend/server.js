// Serves the admin metrics page (`npm run start` in the guide) and proves the chart libraries
// were installed: their versions come from node_modules on the target.
const http = require('http');
const fs = require('fs');
const path = require('path');

const version = (name) =>
  JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'))).version;
const libs = Object.fromEntries(
  ['chart.js', 'react-chartjs-2', 'chartjs-adapter-date-fns', 'date-fns', 'downsample', 'react']
    .map((n) => [n, version(n)]));
const port = Number(process.env.FRONTEND_PORT || 3000);

http.createServer((req, res) => {
  if (req.url === '/admin/metrics') {
    res.writeHead(200, {'Content-Type': 'text/html; charset=utf-8'});
    res.end(`<!doctype html><title>메트릭 대시보드</title><h1>메트릭 대시보드</h1>` +
            `<p>데이터 수집 중입니다</p><script type="application/json" id="libs">` +
            `${JSON.stringify(libs)}</script>`);
  } else if (req.url === '/libs') {
    res.writeHead(200, {'Content-Type': 'application/json'});
    res.end(JSON.stringify(libs));
  } else {
    res.writeHead(404);
    res.end();
  }
}).listen(port, '127.0.0.1');
