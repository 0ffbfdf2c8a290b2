// Prisma CLI settings for an offline `prisma migrate deploy` (Prisma 6.19): the JavaScript
// schema engine (`engine: "js"`, WebAssembly inside the prisma package) talks to PostgreSQL
// through a driver adapter, so no native engine binary is downloaded. The adapter is
// @prisma/adapter-pg 7.x under an alias: 6.19's own fails on PostgreSQL's `name` type when
// it reads the migrations table (upstream prisma/orm#27403).
import { defineConfig } from "prisma/config";
import { PrismaPg } from "prisma-cli-adapter-pg";

export default defineConfig({
  schema: "prisma/schema.prisma",
  engine: "js",
  experimental: { adapter: true },
  adapter: async () => new PrismaPg({ connectionString: process.env.DATABASE_URL }),
});
