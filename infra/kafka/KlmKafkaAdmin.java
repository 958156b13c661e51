// KLM Kafka administration for the secured stack (KLM_KAFKA_SECURITY=sasl).
//
// Kafka 4.4's Maven artifacts that the broker needs do not include the command-line tools
// (kafka-acls / kafka-configs live in kafka-tools, which the broker does not depend on), and
// aiokafka's admin client has no ACL or SCRAM APIs. This single-file program is run with the
// JDK's source launcher on the broker's own classpath:
//
//   java -cp "$(cat .klm/kafka/classpath.txt)" infra/kafka/KlmKafkaAdmin.java \
//        <client.properties> <command>
//
// commands:
//   apply       stdin, one item a line ('#' comments allowed), applied in this order:
//                 user <name> <password-file>   upsert SCRAM-SHA-512 credentials
//                 topic <name> <partitions>     create a missing topic (replication 1)
//                 acl <principal> <operation> <topic|group|cluster> <literal|prefixed> <name>
//                                               an ALLOW binding (existing ones are no-ops)
//   drop-prefix <prefix>   delete every binding on a name under a namespace's prefix
//   list-acls   print every binding, one a line
//
// Passwords are read from files and never printed.

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialAlteration;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class KlmKafkaAdmin {
    static final int SCRAM_ITERATIONS = 8192;

    public static void main(String[] args) throws Exception {
        if (args.length != 2 && !(args.length == 3 && args[1].equals("drop-prefix"))) {
            System.err.println("usage: KlmKafkaAdmin <client.properties> "
                + "apply|list-acls|drop-prefix <prefix>");
            System.exit(2);
        }
        Properties props = new Properties();
        try (var in = Files.newInputStream(Path.of(args[0]))) {
            props.load(in);
        }
        try (Admin admin = Admin.create(props)) {
            switch (args[1]) {
                case "apply" -> apply(admin, stdinLines());
                case "drop-prefix" -> dropPrefix(admin, args[2]);
                case "list-acls" -> listAcls(admin);
                default -> {
                    System.err.println("unknown command: " + args[1]);
                    System.exit(2);
                }
            }
        } catch (ExecutionException e) {
            System.err.println("KlmKafkaAdmin " + args[1] + ": " + e.getCause());
            System.exit(1);
        }
    }

    static List<String[]> stdinLines() throws Exception {
        String text = new String(System.in.readAllBytes(), StandardCharsets.UTF_8);
        List<String[]> out = new ArrayList<>();
        for (String line : text.split("\n")) {
            String t = line.strip();
            if (!t.isEmpty() && !t.startsWith("#")) {
                out.add(t.split("\\s+"));
            }
        }
        return out;
    }

    static void apply(Admin admin, List<String[]> lines) throws Exception {
        List<String[]> users = new ArrayList<>();
        List<String[]> topics = new ArrayList<>();
        List<String[]> acls = new ArrayList<>();
        for (String[] f : lines) {
            String[] rest = java.util.Arrays.copyOfRange(f, 1, f.length);
            switch (f[0]) {
                case "user" -> users.add(rest);
                case "topic" -> topics.add(rest);
                case "acl" -> acls.add(rest);
                default -> throw new IllegalArgumentException("unknown item: " + f[0]);
            }
        }
        if (!users.isEmpty()) {
            upsertUsers(admin, users);
        }
        if (!topics.isEmpty()) {
            createTopics(admin, topics);
        }
        if (!acls.isEmpty()) {
            createAcls(admin, acls);
        }
    }

    // every binding on a resource named under a test or benchmark namespace's prefix (its
    // sub-namespaces included); never production names ("klm." and what starts with it)
    static void dropPrefix(Admin admin, String prefix) throws Exception {
        if ("klm.".startsWith(prefix) || prefix.startsWith("klm.")) {
            throw new IllegalArgumentException("not a namespace prefix: '" + prefix + "'");
        }
        List<AclBindingFilter> filters = admin.describeAcls(AclBindingFilter.ANY).values().get()
            .stream().filter(b -> b.pattern().name().startsWith(prefix))
            .map(AclBinding::toFilter).collect(Collectors.toList());
        int deleted = 0;
        if (!filters.isEmpty()) {
            for (var result : admin.deleteAcls(filters).values().values()) {
                deleted += result.get().values().size();
            }
        }
        System.out.println("acls: " + deleted + " binding(s) under '" + prefix + "' deleted");
    }

    static void createAcls(Admin admin, List<String[]> lines) throws Exception {
        List<AclBinding> bindings = new ArrayList<>();
        for (String[] f : lines) {
            if (f.length != 5) {
                throw new IllegalArgumentException("acl line needs 5 fields: " + String.join(" ", f));
            }
            ResourceType type = ResourceType.fromString(f[2]);
            PatternType pattern = PatternType.fromString(f[3].toUpperCase(java.util.Locale.ROOT));
            AclOperation op = AclOperation.fromString(f[1]);
            if (type == ResourceType.UNKNOWN || pattern == PatternType.UNKNOWN
                    || op == AclOperation.UNKNOWN) {
                throw new IllegalArgumentException("bad acl line: " + String.join(" ", f));
            }
            String name = type == ResourceType.CLUSTER ? "kafka-cluster" : f[4];
            bindings.add(new AclBinding(new ResourcePattern(type, name, pattern),
                new AccessControlEntry(f[0], "*", op, AclPermissionType.ALLOW)));
        }
        admin.createAcls(bindings).all().get();
        System.out.println("acls: " + bindings.size() + " binding(s) in place");
    }

    static void upsertUsers(Admin admin, List<String[]> lines) throws Exception {
        List<UserScramCredentialAlteration> changes = new ArrayList<>();
        for (String[] f : lines) {
            String password = Files.readString(Path.of(f[1])).strip();
            changes.add(new UserScramCredentialUpsertion(f[0],
                new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS), password));
        }
        admin.alterUserScramCredentials(changes).all().get();
        System.out.println("scram-users: " + changes.size() + " user(s) in place");
    }

    static void createTopics(Admin admin, List<String[]> lines) throws Exception {
        Set<String> existing = admin.listTopics().names().get();
        Collection<NewTopic> wanted = lines.stream()
            .filter(f -> !existing.contains(f[0]))
            .map(f -> new NewTopic(f[0], Integer.parseInt(f[1]), (short) 1))
            .collect(Collectors.toList());
        try {
            admin.createTopics(wanted).all().get();
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
        System.out.println("topics: " + wanted.size() + " created, "
            + (lines.size() - wanted.size()) + " existed");
    }

    static void listAcls(Admin admin) throws Exception {
        for (AclBinding b : admin.describeAcls(AclBindingFilter.ANY).values().get()) {
            System.out.println(b.entry().principal() + " " + b.entry().operation() + " "
                + b.pattern().resourceType() + " " + b.pattern().patternType() + " "
                + b.pattern().name());
        }
    }
}
