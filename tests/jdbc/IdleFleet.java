// Many idle PgJDBC connections in one JVM, as a BI server holds them: default driver
// settings, driven line by line over stdin so a test can sequence them.
//   open   -> opens COUNT connections, alternating USER_A and USER_B; prints "opened|COUNT"
//   query  -> each connection reports, from inside the database, who it runs as and its
//             own settings: "row|i|user|current_user|pgproxy.user|extra_float_digits|DateStyle|application_name";
//             then "queried|COUNT"
//   close  -> closes them all, prints "closed" and exits
// Usage: java -cp .:postgresql.jar IdleFleet JDBC_URL COUNT USER_A USER_B
//        (passwords from $PASSWORD_A and $PASSWORD_B)
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class IdleFleet {
    static final String QUERY = "SELECT current_user, current_setting('pgproxy.user'), "
            + "current_setting('extra_float_digits'), current_setting('DateStyle'), "
            + "current_setting('application_name')";

    public static void main(String[] args) throws Exception {
        String url = args[0];
        int count = Integer.parseInt(args[1]);
        String[] users = {args[2], args[3]};
        String[] passwords = {System.getenv("PASSWORD_A"), System.getenv("PASSWORD_B")};
        List<Connection> conns = new ArrayList<>();
        List<String> owners = new ArrayList<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            switch (line.trim()) {
                case "open":
                    for (int i = 0; i < count; i++) {
                        Properties props = new Properties();  // user and password only: the defaults
                        props.setProperty("user", users[i % 2]);
                        props.setProperty("password", passwords[i % 2]);
                        conns.add(DriverManager.getConnection(url, props));
                        owners.add(users[i % 2]);
                    }
                    System.out.println("opened|" + conns.size());
                    break;
                case "query":
                    for (int i = 0; i < conns.size(); i++) {
                        try (Statement st = conns.get(i).createStatement(); ResultSet rs = st.executeQuery(QUERY)) {
                            rs.next();
                            System.out.println("row|" + i + "|" + owners.get(i) + "|" + rs.getString(1) + "|"
                                    + rs.getString(2) + "|" + rs.getString(3) + "|" + rs.getString(4) + "|"
                                    + rs.getString(5));
                        }
                    }
                    System.out.println("queried|" + conns.size());
                    break;
                case "close":
                    for (Connection conn : conns) {
                        conn.close();
                    }
                    System.out.println("closed");
                    return;
                default:
                    System.out.println("unknown|" + line);
            }
            System.out.flush();
        }
    }
}
