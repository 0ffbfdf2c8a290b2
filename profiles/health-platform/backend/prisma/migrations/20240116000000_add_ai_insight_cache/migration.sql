-- CreateTable
CREATE TABLE "AIInsightCache" (
    "id" TEXT NOT NULL,
    "userId" TEXT NOT NULL,
    "insightsData" JSONB NOT NULL,
    "generatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "expiresAt" TIMESTAMP(3) NOT NULL,

    CONSTRAINT "AIInsightCache_pkey" PRIMARY KEY ("id")
);

-- CreateIndex
CREATE INDEX "AIInsightCache_userId_idx" ON "AIInsightCache"("userId");

-- CreateIndex
CREATE INDEX "AIInsightCache_expiresAt_idx" ON "AIInsightCache"("expiresAt");
