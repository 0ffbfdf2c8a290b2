// Stands in for the guide's Spring Boot backend (no Maven repository is reachable here):
// the JDK's own HTTP server, compiled with javac alone. Its /api/health answers like Spring
// Boot Actuator's, and only when the database answers (JDBC driver: Debian's
// libpostgresql-jdbc-java), so a wrong datasource makes the release unhealthy.
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.time.Duration;

public final class ChatbotBackend {
    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void send(HttpExchange ex, int status, String json) throws IOException {
        byte[] body = json.getBytes(StandardCharsets.UTF_8);
        ex.getResponseHeaders().set("Content-Type", "application/json");
        ex.sendResponseHeaders(status, body.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(body);
        }
    }

    private static String quote(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
    }

    private static Connection connect() throws Exception {
        DriverManager.setLoginTimeout(3);
        return DriverManager.getConnection(env("SPRING_DATASOURCE_URL", ""),
                env("SPRING_DATASOURCE_USERNAME", ""), env("SPRING_DATASOURCE_PASSWORD", ""));
    }

    public static void main(String[] args) throws Exception {
        Class.forName("org.postgresql.Driver");
        HttpServer server = HttpServer.create(new InetSocketAddress(8080), 64);
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(3)).build();
        server.createContext("/api/health", ex -> {
            try (Connection c = connect(); Statement s = c.createStatement()) {
                s.execute("SELECT 1");
                send(ex, 200, "{\"status\":\"UP\"}");
            } catch (Exception e) {
                send(ex, 503, "{\"status\":\"DOWN\"}");
            }
        });
        // What the chat UI shows: this release, the AI server's answer, and the FAQ count
        server.createContext("/api/info", ex -> {
            String ai;
            try {
                HttpRequest req = HttpRequest.newBuilder(
                        URI.create(env("AI_SERVER_URL", "http://ai:8000") + "/"))
                        .timeout(Duration.ofSeconds(3)).build();
                ai = client.send(req, HttpResponse.BodyHandlers.ofString()).body();
            } catch (Exception e) {
                ai = "null";
            }
            long faqs = -1;
            try (Connection c = connect(); Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT count(*) FROM faq")) {
                r.next();
                faqs = r.getLong(1);
            } catch (Exception e) {
                faqs = -1;
            }
            send(ex, 200, "{\"service\":\"backend\",\"version\":" + quote(env("APP_VERSION", ""))
                    + ",\"faqs\":" + faqs + ",\"ai\":" + ai + "}");
        });
        server.start();
        System.out.println("backend listening on 8080");
    }
}
