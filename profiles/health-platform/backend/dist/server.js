"use strict";
// A stand-in for the AI Insights backend's build output (`npm run build` -> dist/server.js):
// plain JavaScript, so the bundle carries it as is. It does what the guide's checks look at:
// GET /health, health metrics written to PostgreSQL through the generated Prisma client,
// insights cached in Redis (`ai-insights:<user>`, TTL AI_INSIGHTS_CACHE_TTL) and in the
// AIInsightCache table, AI_INSIGHTS_MIN_DATA_POINTS as the threshold.
const http = require("node:http");
const { PrismaClient } = require("../generated/client");
const { PrismaPg } = require("@prisma/adapter-pg");
const { createClient } = require("redis");

const required = ["DATABASE_URL", "REDIS_URL", "JWT_SECRET"];
const missing = required.filter((name) => !process.env[name]);
if (missing.length) {
  console.error(`[ERROR] missing environment: ${missing.join(", ")}`);
  process.exit(1);
}
const config = {
  port: Number(process.env.PORT || 5000),
  environment: process.env.NODE_ENV || "development",
  cacheTtl: Number(process.env.AI_INSIGHTS_CACHE_TTL || 3600),
  minDataPoints: Number(process.env.AI_INSIGHTS_MIN_DATA_POINTS || 3),
};

const prisma = new PrismaClient({
  adapter: new PrismaPg({ connectionString: process.env.DATABASE_URL }),
});
const redis = createClient({ url: process.env.REDIS_URL });
redis.on("error", (err) => console.error(`[ERROR] redis: ${err.message}`));

function send(res, status, body) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

async function recordMetric(userId, value) {
  await prisma.user.upsert({
    where: { id: userId },
    create: { id: userId, email: `${userId}@example.com` },
    update: {},
  });
  await prisma.healthMetric.create({ data: { userId, value } });
  await redis.del(`ai-insights:${userId}`);
  return { userId, dataPoints: await prisma.healthMetric.count({ where: { userId } }) };
}

async function insights(userId) {
  const key = `ai-insights:${userId}`;
  const hit = await redis.get(key);
  if (hit !== null) {
    console.log(`[INFO] Cache hit for user: ${userId}`);
    return { cached: true, ...JSON.parse(hit) };
  }
  const started = Date.now();
  const metrics = await prisma.healthMetric.findMany({ where: { userId } });
  if (metrics.length < config.minDataPoints) {
    console.log(`[WARN] Insufficient data for user: ${userId}, data points: ${metrics.length}`);
    return { cached: false, insufficient: true, dataPoints: metrics.length };
  }
  const values = metrics.map((m) => m.value);
  const data = {
    dataPoints: values.length,
    average: values.reduce((a, b) => a + b, 0) / values.length,
    max: Math.max(...values),
  };
  await prisma.aIInsightCache.create({
    data: {
      id: `${userId}-${started}`,
      userId,
      insightsData: data,
      expiresAt: new Date(started + config.cacheTtl * 1000),
    },
  });
  await redis.set(key, JSON.stringify(data), { EX: config.cacheTtl });
  console.log(`[INFO] AI Insights generated for user: ${userId}, duration: ${Date.now() - started}ms`);
  return { cached: false, ...data };
}

async function handle(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (req.method === "GET" && url.pathname === "/health") {
    return send(res, 200, {
      status: "ok",
      timestamp: new Date().toISOString(),
      uptime: process.uptime(),
      environment: config.environment,
      aiInsights: { cacheTtl: config.cacheTtl, minDataPoints: config.minDataPoints },
    });
  }
  const user = url.searchParams.get("user");
  if (url.pathname === "/api/metrics" && req.method === "POST" && user) {
    return send(res, 201, await recordMetric(user, Number(url.searchParams.get("value"))));
  }
  if (url.pathname === "/api/ai-insights" && req.method === "GET" && user) {
    return send(res, 200, await insights(user));
  }
  return send(res, 404, { error: "not found" });
}

async function main() {
  await redis.connect();
  const server = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      console.error(`[ERROR] ${req.method} ${req.url}: ${err.message}`);
      send(res, 500, { error: err.message });
    });
  });
  server.listen(config.port, "127.0.0.1", () => {
    console.log(`[INFO] health-platform backend (${config.environment}) on port ${config.port}`);
  });
  const stop = () => server.close(() => Promise.all([prisma.$disconnect(), redis.quit()])
    .finally(() => process.exit(0)));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(`[ERROR] startup failed: ${err.message}`);
  process.exit(1);
});
